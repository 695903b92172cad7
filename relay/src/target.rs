//! The failback controller's client of the master target's control requests: one QUIC
//! stream per request on the relay's connection (`Control`, answered by `ControlAnswer`
//! frames whose bodies make one JSON document, up to the stream's end:
//! docs/PROTOCOL.md), with a deadline and a bound on the answer's size.

use std::time::Duration;

use fbr_controller::target::{Answer, Request};
use fbr_protocol::Frame;
use fbr_transport::{FrameReader, FrameWriter, PeerLink};

/// Longest a request may take: making a copy of large disks takes minutes.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);
/// The largest answer read (a status of many VMs with many points each).
pub const MAX_ANSWER: usize = 64 << 20;
/// Longest a status request may take (asked before every job).
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `ask`'s error means the master target could not be reached (worth asking
/// again), rather than that it refused.
pub fn is_unreachable(error: &str) -> bool {
    error.starts_with("the master target is unreachable")
        || error.starts_with("the master target did not answer within")
        || error.starts_with("sending to the master target")
        || error.starts_with("reading the master target's answer")
        || error.starts_with("the master target closed the stream")
}

/// Asks the master target `request`; the answer, or why there is none (unreachable,
/// timed out, refused: the refusal's reason).
pub async fn ask(link: &PeerLink, request: &Request, timeout: Duration) -> Result<Answer, String> {
    let body = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    let exchange = async {
        let (send, recv) = link
            .open_stream()
            .await
            .map_err(|e| format!("the master target is unreachable: {e}"))?;
        let (mut writer, mut reader) = (FrameWriter::new(send), FrameReader::new(recv));
        writer
            .send(&Frame::Control {
                request: body.into(),
            })
            .await
            .map_err(|e| format!("sending to the master target: {e}"))?;
        writer.finish().await;
        // The answer's parts up to the stream's end (docs/PROTOCOL.md, ControlAnswer).
        let mut body = Vec::new();
        loop {
            match reader.next().await {
                Ok(Some(Frame::ControlAnswer { answer })) => {
                    if body.len() + answer.len() > MAX_ANSWER {
                        return Err(format!(
                            "the master target's answer is larger than {MAX_ANSWER} bytes"
                        ));
                    }
                    body.extend_from_slice(&answer);
                }
                Ok(Some(Frame::Error { code, message })) => {
                    return Err(format!(
                        "the master target refused the request ({}): {message}",
                        code.name()
                    ))
                }
                Ok(Some(other)) => {
                    return Err(format!(
                        "the master target answered {:?}",
                        other.frame_type()
                    ))
                }
                Ok(None) if body.is_empty() => {
                    return Err("the master target closed the stream without answering".into())
                }
                Ok(None) => break,
                Err(e) => return Err(format!("reading the master target's answer: {e}")),
            }
        }
        serde_json::from_slice::<Answer>(&body)
            .map_err(|e| format!("the master target's answer: {e}"))
    };
    let answer = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("the master target did not answer within {timeout:?}"))??;
    if !answer.ok {
        return Err(answer
            .error
            .clone()
            .unwrap_or_else(|| "the master target refused the request".into()));
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fbr_transport::{client_endpoint, server_endpoint, Credentials, QuicTuning, Role};

    /// An answer larger than a frame arrives in several `ControlAnswer` frames, and the
    /// relay reads them all, up to the stream's end, as one document.
    #[tokio::test]
    async fn an_answer_spread_over_frames_is_read_whole() {
        let pki = tempfile::tempdir().unwrap();
        fbr_transport::pki::init_loopback_site(pki.path(), &[]).unwrap();
        let tuning = QuicTuning::default();
        let mt_creds = Credentials::load(pki.path(), "master-target").unwrap();
        let server = server_endpoint("127.0.0.1:0".parse().unwrap(), mt_creds, &tuning).unwrap();
        let addr = server.local_addr().unwrap();
        // 20,000 disks: about 1.6 MB of JSON, two frames and a part.
        let disks: Vec<serde_json::Value> = (0..20_000)
            .map(|i| {
                serde_json::json!({"vm": format!("vm{i}"), "disk": 0, "disk_size": 1u64 << 30,
                    "state": "consistent", "seq": i})
            })
            .collect();
        let body = serde_json::to_vec(&serde_json::json!({
            "ok": true, "status": {"free_bytes": 1, "disks": disks}, "points": {"vms": []}
        }))
        .unwrap();
        assert!(body.len() > fbr_protocol::MAX_FRAME_PAYLOAD);
        let answering = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let (send, recv) = conn.accept_bi().await.unwrap();
            let (mut writer, mut reader) = (FrameWriter::new(send), FrameReader::new(recv));
            assert!(matches!(
                reader.next().await,
                Ok(Some(Frame::Control { .. }))
            ));
            for chunk in body.chunks(fbr_protocol::MAX_FRAME_PAYLOAD) {
                writer
                    .send(&Frame::ControlAnswer {
                        answer: bytes::Bytes::copy_from_slice(chunk),
                    })
                    .await
                    .unwrap();
            }
            writer.finish().await;
            // Held until the relay has read it all.
            conn.closed().await;
        });
        let relay_creds = Credentials::load(pki.path(), "relay").unwrap();
        let client = client_endpoint("127.0.0.1:0".parse().unwrap(), relay_creds, &tuning).unwrap();
        let link = PeerLink::new(client, addr, "master-target".into(), Role::MasterTarget);
        let answer = ask(&link, &Request::Status, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(answer.status.unwrap().disks.len(), 20_000);
        link.close("done").await;
        answering.await.unwrap();
    }
}
