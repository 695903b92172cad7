//! Golden bytes of the cache format (docs/CACHE-FORMAT.md). If these fail, the on-disk
//! format changed: bump CACHE_VERSION and document it, never just the bytes.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use bytes::BytesMut;
use fbr_cache::format::{
    decode_entry, decode_footer, decode_segment_header, decode_trailer, encode_entry,
    encode_footer, encode_segment_header, CacheEntry, Footer, FooterEntry, CACHE_VERSION,
};
use fbr_protocol::{Record, StreamId};

#[test]
fn segment_header_bytes() {
    assert_eq!(CACHE_VERSION, 1);
    let h = encode_segment_header(7, 0x0102);
    let mut golden = Vec::new();
    golden.extend_from_slice(b"FBRCACHE");
    golden.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]); // version, reserved
    golden.extend_from_slice(&[7, 0, 0, 0, 0, 0, 0, 0]); // segment id
    golden.extend_from_slice(&[2, 1, 0, 0, 0, 0, 0, 0]); // created ms
    assert_eq!(&h[..], &golden[..]);
    assert_eq!(decode_segment_header(&h).unwrap(), (7, 0x0102));
}

#[test]
fn entry_bytes() {
    let e = CacheEntry {
        stream: StreamId {
            vm: "vm".into(),
            disk: 1,
        },
        disk_size: 4096,
        appended_ms: 5,
        record: Record::Zero {
            seq: 3,
            offset: 512,
            len: 512,
        },
    };
    let mut b = BytesMut::new();
    let n = encode_entry(&e, &mut b);
    let mut body = vec![1u8, 2, 0, 0]; // kind, vm_len, reserved
    body.extend_from_slice(&[1, 0, 0, 0]); // disk
    body.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0]); // seq
    body.extend_from_slice(&[0, 0x10, 0, 0, 0, 0, 0, 0]); // disk size
    body.extend_from_slice(&[5, 0, 0, 0, 0, 0, 0, 0]); // appended ms
    body.extend_from_slice(b"vm");
    body.extend_from_slice(&[b'F', b'B', 1, 0x11, 24, 0, 0, 0]); // Zero frame header
    body.extend_from_slice(&[
        3, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0,
    ]);
    let mut golden = (body.len() as u32).to_le_bytes().to_vec();
    golden.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    golden.extend_from_slice(&body);
    assert_eq!(&b[..], &golden[..]);
    assert_eq!(n, golden.len());
    assert_eq!(decode_entry(&golden).unwrap(), e);
    let mut bad = golden.clone();
    bad[40] ^= 1;
    assert!(decode_entry(&bad).unwrap_err().contains("CRC32C"));
}

#[test]
fn footer_and_trailer_bytes() {
    let f = Footer {
        streams: vec![(
            StreamId {
                vm: "a".into(),
                disk: 2,
            },
            1024,
        )],
        entries: vec![FooterEntry {
            stream_ref: 0,
            seq: 9,
            offset: 32,
            len: 80,
            appended_ms: 6,
        }],
    };
    let bytes = encode_footer(&f, 112);
    let mut golden = vec![1, 0, 0, 0, 1, b'a', 2, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0]; // stream table
    golden.extend_from_slice(&[1, 0, 0, 0]); // entry count
    golden.extend_from_slice(&[
        0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0, 0, 80, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0,
    ]);
    let footer_len = golden.len();
    let crc = crc32c::crc32c(&golden);
    golden.extend_from_slice(&[112, 0, 0, 0, 0, 0, 0, 0]);
    golden.extend_from_slice(&(footer_len as u32).to_le_bytes());
    golden.extend_from_slice(&crc.to_le_bytes());
    golden.extend_from_slice(b"FBRCFOOT");
    assert_eq!(bytes, golden);
    let (offset, len, c) = decode_trailer(&golden[footer_len..]).unwrap();
    assert_eq!((offset, len as usize, c), (112, footer_len, crc));
    assert_eq!(decode_footer(&golden[..footer_len]).unwrap(), f);
}
