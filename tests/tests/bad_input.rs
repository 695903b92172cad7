//! Hostile and broken input: every case gets a clear coded error, nothing partial is
//! applied, and other streams keep flowing.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::time::Duration;

use bytes::BufMut;
use fbr_protocol::{ErrorCode, Frame, MAX_FRAME_PAYLOAD};
use fbr_tests::{start_site, write, RawAgent};
use fbr_transport::Credentials;

const DISK: u64 = 4 << 20;

/// Expects the stream to end with an `Error` of `code`; returns the highest ack seen.
async fn expect_error(s: &mut fbr_tests::RawStream, code: ErrorCode) -> u64 {
    let (frame, acked) = s.until_error().await;
    match frame {
        Some(Frame::Error { code: got, message }) => {
            assert_eq!(got, code, "wrong error code; message: {message}");
            assert!(!message.is_empty(), "error frames carry a reason");
        }
        other => panic!("expected an Error {code}, got {other:?}"),
    }
    acked
}

/// Writes one more record on the healthy stream and waits for its acknowledgement.
async fn keep_flowing(good: &mut fbr_tests::RawStream, seq: &mut u64) {
    *seq += 1;
    good.send_frame(&write(*seq, (*seq % 64) * 4096, 4096, *seq as u8))
        .await;
    good.wait_ack(*seq).await;
}

/// Reopens a disk and returns the next sequence number the master target expects.
async fn next_seq(agent: &RawAgent, vm: &str, disk: u32) -> u64 {
    let (mut s, next) = agent.open_disk(vm, disk, DISK).await;
    s.send.finish().ok();
    let _ = s.until_error().await;
    next
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_streams_are_refused_with_codes_while_a_good_stream_keeps_flowing() {
    let site = start_site(&["vm1"]);
    let agent = RawAgent::connect(&site).await;

    // A healthy stream that keeps writing throughout.
    let (mut good, first) = agent.open_disk("vm1", 0, DISK).await;
    assert_eq!(first, 1);
    let mut good_seq = 0;
    keep_flowing(&mut good, &mut good_seq).await;

    // Garbage instead of a frame.
    let (mut s, _) = agent.open_disk("vm1", 1, DISK).await;
    s.send_bytes(b"GET / HTTP/1.1\r\n\r\n").await;
    expect_error(&mut s, ErrorCode::MalformedFrame).await;
    keep_flowing(&mut good, &mut good_seq).await;

    // A header announcing more than the limit: refused before any payload is read.
    let (mut s, _) = agent.open_disk("vm1", 1, DISK).await;
    let mut hdr = bytes::BytesMut::from(&b"FB\x01\x10"[..]);
    hdr.put_u32_le(MAX_FRAME_PAYLOAD as u32 + 1);
    s.send_bytes(&hdr).await;
    expect_error(&mut s, ErrorCode::FrameTooLarge).await;
    keep_flowing(&mut good, &mut good_seq).await;

    // Two good records, then a truncated one (the stream ends mid-frame).
    let (mut s, n) = agent.open_disk("vm1", 1, DISK).await;
    assert_eq!(n, 1);
    s.send_frame(&write(1, 0, 4096, 1)).await;
    s.send_frame(&write(2, 4096, 4096, 2)).await;
    let mut partial = bytes::BytesMut::new();
    fbr_protocol::encode_frame(&write(3, 8192, 4096, 3), &mut partial);
    s.send_bytes(&partial[..100]).await;
    s.send.finish().unwrap();
    let acked = expect_error(&mut s, ErrorCode::MalformedFrame).await;
    assert_eq!(
        acked, 2,
        "the records before the broken one are applied and acknowledged"
    );
    assert_eq!(
        next_seq(&agent, "vm1", 1).await,
        3,
        "nothing of the truncated record is applied"
    );
    keep_flowing(&mut good, &mut good_seq).await;

    // A sequence gap: the record after the gap is not applied.
    let (mut s, n) = agent.open_disk("vm1", 1, DISK).await;
    assert_eq!(n, 3);
    s.send_frame(&write(3, 0, 512, 9)).await;
    s.send_frame(&write(5, 0, 512, 9)).await;
    let acked = expect_error(&mut s, ErrorCode::SequenceGap).await;
    assert_eq!(acked, 3);
    assert_eq!(next_seq(&agent, "vm1", 1).await, 4);

    // Duplicates are skipped silently and acknowledged; the stream carries on.
    let (mut s, n) = agent.open_disk("vm1", 1, DISK).await;
    assert_eq!(n, 4);
    s.send_frame(&write(2, 0, 512, 0xEE)).await; // replay of an applied record
    s.send_frame(&write(3, 0, 512, 0xEE)).await;
    s.send_frame(&write(4, 0, 512, 4)).await;
    s.wait_ack(4).await;
    s.send.finish().unwrap();
    assert_eq!(s.until_error().await.0, None, "no error for duplicates");
    keep_flowing(&mut good, &mut good_seq).await;

    // A write past the end of the disk, and a misaligned one.
    let (mut s, _) = agent.open_disk("vm1", 1, DISK).await;
    s.send_frame(&write(5, DISK - 512, 1024, 1)).await;
    expect_error(&mut s, ErrorCode::OutOfBounds).await;
    let (mut s, _) = agent.open_disk("vm1", 1, DISK).await;
    s.send_frame(&write(5, 100, 512, 1)).await;
    expect_error(&mut s, ErrorCode::Misaligned).await;
    assert_eq!(next_seq(&agent, "vm1", 1).await, 5, "neither was applied");

    // A record before Hello, and a second Hello in the middle of a stream.
    let mut s = agent.open().await;
    s.send_frame(&write(1, 0, 512, 1)).await;
    expect_error(&mut s, ErrorCode::UnexpectedFrame).await;
    let (mut s, _) = agent.open_disk("vm1", 1, DISK).await;
    s.send_frame(&Frame::Hello {
        placement: 0,
        stream: fbr_protocol::StreamId {
            vm: "vm1".into(),
            disk: 1,
        },
        disk_size: DISK,
    })
    .await;
    expect_error(&mut s, ErrorCode::UnexpectedFrame).await;

    // The same disk announced with another size.
    let mut s = agent.open().await;
    s.send_frame(&Frame::Hello {
        placement: 0,
        stream: fbr_protocol::StreamId {
            vm: "vm1".into(),
            disk: 1,
        },
        disk_size: DISK * 2,
    })
    .await;
    expect_error(&mut s, ErrorCode::DiskSizeMismatch).await;

    // A VM the certificate does not name.
    let mut s = agent.open().await;
    s.send_frame(&Frame::Hello {
        placement: 0,
        stream: fbr_protocol::StreamId {
            vm: "vm2".into(),
            disk: 0,
        },
        disk_size: DISK,
    })
    .await;
    expect_error(&mut s, ErrorCode::NotEntitled).await;

    // Through all of it, the healthy stream kept going.
    keep_flowing(&mut good, &mut good_seq).await;
    assert_eq!(
        good_seq, 6,
        "one good record acknowledged after each round of bad input"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_a_valid_certificate_are_refused() {
    let site = start_site(&["vm1"]);
    let foreign = tempfile::tempdir().unwrap();
    fbr_transport::pki::init_loopback_site(foreign.path(), &["vm1".to_string()]).unwrap();

    // An agent certificate from another CA, presented to our relay (the client trusts
    // the relay, so only the relay's check can stop it).
    let mut creds = Credentials::load(foreign.path(), "agent").unwrap();
    creds.roots = Credentials::load(&site.pki_dir, "agent").unwrap().roots;
    let refused = match RawAgent::connect_with(&site, creds).await {
        Err(_) => true,
        Ok(agent) => {
            // TLS 1.3: the client may finish first; the relay's alert closes it.
            let r = tokio::time::timeout(Duration::from_secs(10), async {
                let (mut send, mut recv) = agent.conn.open_bi().await?;
                send.write_all(b"FB").await?;
                recv.read_chunk(16, true).await?;
                anyhow::Ok(())
            })
            .await;
            !matches!(r, Ok(Ok(())))
        }
    };
    assert!(refused, "a certificate from another CA must be refused");

    // A certificate of our CA but with the wrong role (the master target's) is refused.
    let creds = Credentials::load(&site.pki_dir, "master-target").unwrap();
    let agent = RawAgent::connect_with(&site, creds).await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(10), agent.conn.closed())
        .await
        .unwrap();
    assert!(
        reason.to_string().contains("role:agent"),
        "close reason names the missing role: {reason}"
    );

    let relay_log = std::fs::read_to_string(site.root.join("logs/relay.log")).unwrap();
    assert!(
        relay_log.contains("refused during handshake"),
        "the relay logs the foreign certificate"
    );
    assert!(
        relay_log.contains("refusing connection"),
        "the relay logs the wrong role"
    );
}

/// One agent connection may hold at most `AGENT_STREAMS_PER_CONNECTION` streams at once
/// (the stream state quinn keeps per connection is bounded by it): the next waits,
/// while the streams it already has keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_connection_holds_a_bounded_number_of_streams() {
    use fbr_relay::server::AGENT_STREAMS_PER_CONNECTION;
    let site = start_site(&["vm1"]);
    let agent = RawAgent::connect(&site).await;
    let (mut good, next) = agent.open_disk("vm1", 0, DISK).await;
    let mut good_seq = next - 1;
    let mut idle = Vec::new();
    for _ in 1..AGENT_STREAMS_PER_CONNECTION {
        let opened = tokio::time::timeout(Duration::from_secs(5), agent.conn.open_bi()).await;
        idle.push(opened.expect("within the limit").unwrap());
    }
    let beyond = tokio::time::timeout(Duration::from_secs(2), agent.conn.open_bi()).await;
    assert!(
        beyond.is_err(),
        "stream {} beyond the limit opened",
        idle.len() + 2
    );
    keep_flowing(&mut good, &mut good_seq).await;
}
