//! Golden bytes of the journal format (docs/JOURNAL-FORMAT.md). If these fail, the
//! on-disk format changed: bump JOURNAL_VERSION and document it, never just the bytes.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use bytes::{Bytes, BytesMut};
use fbr_master_target::journal::{decode_entry, encode_entry, encode_header, JOURNAL_VERSION};
use fbr_protocol::Record;

#[test]
fn header_bytes() {
    assert_eq!(JOURNAL_VERSION, 1);
    assert_eq!(encode_header(), *b"FBRJOURN\x01\0\0\0\0\0\0\0");
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
