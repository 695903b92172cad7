//! Feeds arbitrary bytes to the journal entry decoder (what recovery and a rollback read
//! after a crash or on a damaged disk), records and before-images alike: it must never
//! panic, and whatever it accepts must re-encode to the same bytes.
#![no_main]

use bytes::BytesMut;
use fbr_master_target::journal::{
    decode_any_entry, encode_entry, encode_undo, undo_entry_view, Before, JournalEntry,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The in-place reader a rollback uses agrees with the full decoder.
    if let Ok(view) = undo_entry_view(data, 0) {
        match decode_any_entry(data, 0) {
            Ok(Some((JournalEntry::Undo(u), used))) => {
                assert_eq!(used, data.len());
                assert_eq!(
                    (u.seq, u.offset, u.len()),
                    (view.seq, view.offset, view.len)
                );
            }
            other => panic!("undo_entry_view accepted what decode_any_entry reads as {other:?}"),
        }
    }
    let mut at = 0;
    while let Ok(Some((entry, used))) = decode_any_entry(&data[at..], at as u64) {
        let mut again = BytesMut::new();
        match &entry {
            JournalEntry::Record(record) => encode_entry(record, &mut again),
            JournalEntry::Undo(u) => match &u.before {
                Before::Data(d) => {
                    encode_undo(u.seq, u.offset, d.len() as u64, Some(d), &mut again)
                }
                Before::Zeros(n) => encode_undo(u.seq, u.offset, *n, None, &mut again),
            },
        }
        assert_eq!(&again[..], &data[at..at + used]);
        at += used;
    }
});
