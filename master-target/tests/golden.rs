//! Golden bytes of the journal format (docs/JOURNAL-FORMAT.md). If these fail, the
//! on-disk format changed: bump JOURNAL_VERSION and document it, never just the bytes.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use bytes::{Bytes, BytesMut};
use fbr_master_target::journal::{
    decode_any_entry, decode_entry, encode_entry, encode_header, encode_undo, Before, JournalEntry,
    UndoEntry, JOURNAL_VERSION,
};
use fbr_protocol::Record;

#[test]
fn header_bytes() {
    assert_eq!(JOURNAL_VERSION, 2);
    assert_eq!(encode_header(), *b"FBRJOURN\x02\0\0\0\0\0\0\0");
}

/// A before-image as bytes: "UN", kind 1, then seq, offset, len and the data.
#[test]
fn undo_entry_bytes() {
    let mut b = BytesMut::new();
    encode_undo(7, 1024, 4, Some(&[0xDE, 0xAD, 0xBE, 0xEF]), &mut b);
    let frame: &[u8] = &[
        b'U', b'N', 1, 0, 0, 0, 0, 0, // undo, kind 1 (data), reserved
        7, 0, 0, 0, 0, 0, 0, 0, // seq 7
        0, 4, 0, 0, 0, 0, 0, 0, // offset 1024
        4, 0, 0, 0, 0, 0, 0, 0, // len 4
        0xDE, 0xAD, 0xBE, 0xEF, // the bytes before
    ];
    let mut golden = Vec::new();
    golden.extend_from_slice(&36u32.to_le_bytes());
    golden.extend_from_slice(&crc32c::crc32c(frame).to_le_bytes());
    golden.extend_from_slice(frame);
    assert_eq!(&b[..], &golden[..]);
    let (entry, used) = decode_any_entry(&b, 16).unwrap().unwrap();
    assert_eq!(used, b.len());
    assert_eq!(
        entry,
        JournalEntry::Undo(UndoEntry {
            seq: 7,
            offset: 1024,
            before: Before::Data(Bytes::from_static(&[0xDE, 0xAD, 0xBE, 0xEF])),
        })
    );
    // A record reader refuses it as a record.
    assert!(decode_entry(&b, 16).is_err());
}

/// A before-image of zeros carries no data: kind 2.
#[test]
fn zero_undo_entry_bytes() {
    let mut b = BytesMut::new();
    encode_undo(8, 0, 65536, None, &mut b);
    let frame: &[u8] = &[
        b'U', b'N', 2, 0, 0, 0, 0, 0, // undo, kind 2 (zeros)
        8, 0, 0, 0, 0, 0, 0, 0, // seq 8
        0, 0, 0, 0, 0, 0, 0, 0, // offset 0
        0, 0, 1, 0, 0, 0, 0, 0, // len 65536
    ];
    assert_eq!(&b[8..], frame);
    assert_eq!(&b[..4], &32u32.to_le_bytes());
    let (entry, _) = decode_any_entry(&b, 16).unwrap().unwrap();
    assert_eq!(
        entry,
        JournalEntry::Undo(UndoEntry {
            seq: 8,
            offset: 0,
            before: Before::Zeros(65536),
        })
    );
}

/// Hostile undo entries are refused with a reason, never applied.
#[test]
fn bad_undo_entries_are_refused() {
    let bad = |patch: fn(&mut Vec<u8>)| {
        let mut b = BytesMut::new();
        encode_undo(7, 1024, 4, Some(&[1, 2, 3, 4]), &mut b);
        let mut v = b.to_vec();
        patch(&mut v);
        // Re-seal the CRC so only the content is at fault.
        let crc = crc32c::crc32c(&v[8..]);
        v[4..8].copy_from_slice(&crc.to_le_bytes());
        decode_any_entry(&v, 16).unwrap_err().to_string()
    };
    assert!(bad(|v| v[10] = 9).contains("unknown kind 9"));
    assert!(bad(|v| v[11] = 1).contains("reserved"));
    assert!(bad(|v| v[32] = 5).contains("4 data bytes for kind 1 of length 5"));
    assert!(bad(|v| v[32..40].copy_from_slice(&0u64.to_le_bytes())).contains("out of range"));
}

#[test]
fn zero_entry_bytes() {
    let r = Record::Zero {
        seq: 1,
        offset: 512,
        len: 4096,
    };
    let mut b = BytesMut::new();
    encode_entry(&r, &mut b);
    let frame: &[u8] = &[
        b'F', b'B', 1, 0x11, 24, 0, 0, 0, // frame header: Zero, 24-byte payload
        1, 0, 0, 0, 0, 0, 0, 0, // seq 1
        0, 2, 0, 0, 0, 0, 0, 0, // offset 512
        0, 0x10, 0, 0, 0, 0, 0, 0, // len 4096
    ];
    let mut golden = Vec::new();
    golden.extend_from_slice(&32u32.to_le_bytes()); // frame_len
    golden.extend_from_slice(&crc32c::crc32c(frame).to_le_bytes());
    golden.extend_from_slice(frame);
    assert_eq!(&b[..], &golden[..]);
    // The CRC is CRC32C (Castagnoli): pin its value so a switch to IEEE CRC-32 shows.
    assert_eq!(
        crc32c::crc32c(frame),
        0xAA6F_0DDD,
        "crc of the golden frame"
    );
    assert_eq!(decode_entry(&b, 16).unwrap().unwrap().0, r);
}

#[test]
fn crc32c_known_answer() {
    // The standard check value of CRC-32C (Castagnoli) over "123456789".
    assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
}

#[test]
fn write_entry_round_trips() {
    let r = Record::Write {
        seq: 9,
        offset: 4096,
        data: Bytes::from(vec![0xA5; 1024]),
    };
    let mut b = BytesMut::new();
    encode_entry(&r, &mut b);
    assert_eq!(b.len(), 8 + 8 + 16 + 1024);
    assert_eq!(decode_entry(&b, 16).unwrap(), Some((r, b.len())));
}
