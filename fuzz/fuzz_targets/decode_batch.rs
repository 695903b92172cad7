//! Feeds arbitrary bytes to the WAN batch decoder (a hostile or corrupted `Batch`
//! payload): it must never panic nor allocate beyond its limits, and whatever decodes
//! must survive re-encoding and resolve without panicking.
#![no_main]

use bytes::{Bytes, BytesMut};
use fbr_protocol::wan::{decode_batch, encode_batch, resolve, Compressor};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = decode_batch(Bytes::copy_from_slice(data)) {
        let mut out = BytesMut::new();
        encode_batch(&batch, Compressor::None, &mut Vec::new(), &mut out).unwrap();
        assert_eq!(decode_batch(out.freeze()).ok().as_ref(), Some(&batch));
        for item in batch.items {
            let _ = resolve(item, |_, n| Some(Bytes::from(vec![0u8; n])));
        }
    }
});
