//! Feeds arbitrary bytes to the cache's entry and footer decoders (what recovery and the
//! forwarders read from the cache disk): they must never panic, and an accepted entry
//! must re-encode to the same bytes.
#![no_main]

use bytes::BytesMut;
use fbr_cache::format::{decode_entry, decode_footer, encode_entry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(entry) = decode_entry(data) {
        let mut again = BytesMut::new();
        encode_entry(&entry, &mut again);
        assert_eq!(&again[..], data);
    }
    let _ = decode_footer(data);
});
