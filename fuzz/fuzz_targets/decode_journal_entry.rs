//! Feeds arbitrary bytes to the journal entry decoder (what recovery reads after a
//! crash or on a damaged disk): it must never panic, and whatever it accepts must
//! re-encode to the same bytes.
#![no_main]

use bytes::BytesMut;
use fbr_master_target::journal::{decode_entry, encode_entry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while let Ok(Some((record, used))) = decode_entry(&data[at..], at as u64) {
        let mut again = BytesMut::new();
        encode_entry(&record, &mut again);
        assert_eq!(&again[..], &data[at..at + used]);
        at += used;
    }
});
