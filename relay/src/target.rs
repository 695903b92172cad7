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
        match reader.next().await {
            Ok(Some(Frame::ControlAnswer { answer })) => serde_json::from_slice::<Answer>(&answer)
                .map_err(|e| format!("the master target's answer: {e}")),
            Ok(Some(Frame::Error { code, message })) => Err(format!(
                "the master target refused the request ({}): {message}",
                code.name()
            )),
            Ok(Some(other)) => Err(format!(
                "the master target answered {:?}",
                other.frame_type()
            )),
            Ok(None) => Err("the master target closed the stream without answering".into()),
            Err(e) => Err(format!("reading the master target's answer: {e}")),
        }
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
