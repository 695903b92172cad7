//! Feeds a hostile relay's stream of `Batch` payloads to one master-target zstd
//! context (`fbr_protocol::codec`): the input is cut into payloads at 0xFF 0xFE 0xFD
//! markers, and each is decoded in order through the same `StreamDecompressor`, as a
//! master target's stream receiver does. It must never panic, never decode a body
//! other than the announced length, and never allocate beyond the window it granted
//! (2^20 here: a frame asking for more is refused).
#![no_main]

use bytes::Bytes;
use fbr_protocol::codec::{decompressor_cost, CodecMemory, StreamDecompressor};
use fbr_protocol::wan::decode_batch_with;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let pool = CodecMemory::new(1 << 30);
    let Some(reservation) = pool.reserve(1, 20, decompressor_cost) else {
        return;
    };
    let Ok(mut context) = StreamDecompressor::new(reservation) else {
        return;
    };
    for payload in split(data) {
        if decode_batch_with(Bytes::copy_from_slice(payload), Some(&mut context)).is_err() {
            // The stream ends at its first bad batch, as a receiver's does.
            break;
        }
        assert!(context.memory() as u64 <= decompressor_cost(20));
    }
});

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(3).position(|w| w == [0xFF, 0xFE, 0xFD]) {
        out.push(&rest[..i]);
        rest = &rest[i + 3..];
    }
    out.push(rest);
    out
}
