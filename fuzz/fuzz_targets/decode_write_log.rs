//! Feeds arbitrary bytes to the write-log record decoder (`churn replay` input): it must
//! never panic, and whatever it accepts must re-encode to the same bytes.
#![no_main]

use bytes::BytesMut;
use fbr_churn::writelog::{decode_record, encode_record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while let Ok(Some((record, used))) = decode_record(&data[at..]) {
        let mut again = BytesMut::new();
        encode_record(&record, &mut again);
        assert_eq!(&again[..], &data[at..at + used]);
        at += used;
    }
});
