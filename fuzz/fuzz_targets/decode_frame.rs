//! Feeds arbitrary bytes to the frame decoder, in two pieces split at an arbitrary point
//! (as a network would), and checks that it never panics and that whatever decodes
//! re-encodes to the same bytes.
#![no_main]

use bytes::BytesMut;
use fbr_protocol::{decode_frame, encode_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let cut = data[0] as usize % data.len();
    let body = &data[1..];
    let cut = cut.min(body.len());
    let mut buf = BytesMut::from(&body[..cut]);
    let mut consumed = Vec::new();
    let mut feed_rest = true;
    loop {
        let before = buf.clone();
        match decode_frame(&mut buf) {
            Ok(Some(frame)) => {
                let mut again = BytesMut::new();
                encode_frame(&frame, &mut again);
                assert_eq!(&again[..], &before[..again.len()], "re-encoding differs");
                consumed.push(frame);
            }
            Ok(None) if feed_rest => {
                buf.extend_from_slice(&body[cut..]);
                feed_rest = false;
            }
            Ok(None) | Err(_) => break,
        }
    }
});
