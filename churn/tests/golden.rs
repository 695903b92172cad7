//! Golden bytes of the write-log format (docs/WRITE-LOG-FORMAT.md), and its checks.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use bytes::{Bytes, BytesMut};
use fbr_churn::workload::Change;
use fbr_churn::writelog::{
    decode_record, encode_header, encode_record, LogReader, LogRecord, LogWriter,
};
use fbr_protocol::StreamId;

#[test]
fn header_and_records() {
    assert_eq!(encode_header(), *b"FBRWLOG1\x01\0\0\0\0\0\0\0");
    let cases: Vec<(LogRecord, Vec<u8>)> = vec![
        (
            LogRecord::Disk {
                index: 1,
                size: 1 << 20,
                id: StreamId {
                    vm: "db".into(),
                    disk: 2,
                },
            },
            vec![
                1, 1, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 2, b'd', b'b', 2, 0, 0, 0,
            ],
        ),
        (
            LogRecord::Change {
                index: 1,
                change: Change::Write {
                    offset: 512,
                    data: Bytes::from_static(&[7; 4]),
                },
            },
            vec![
                2, 1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 7, 7, 7, 7,
            ],
        ),
        (
            LogRecord::Change {
                index: 1,
                change: Change::Zero {
                    offset: 0,
                    len: 1024,
                },
            },
            vec![
                3, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0,
            ],
        ),
    ];
    for (rec, golden) in cases {
        let mut b = BytesMut::new();
        encode_record(&rec, &mut b);
        assert_eq!(&b[..], &golden[..], "{rec:?}");
        assert_eq!(decode_record(&golden).unwrap(), Some((rec, golden.len())));
        assert_eq!(decode_record(&golden[..golden.len() - 1]).unwrap(), None);
    }
}

#[test]
fn reader_names_the_offending_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.fbrwlog");
    let mut w = LogWriter::create(&path).unwrap();
    let id = StreamId {
        vm: "vm1".into(),
        disk: 0,
    };
    w.append(&LogRecord::Disk {
        index: 0,
        size: 1 << 20,
        id,
    })
    .unwrap();
    w.append(&LogRecord::Change {
        index: 0,
        change: Change::Zero {
            offset: 0,
            len: 512,
        },
    })
    .unwrap();
    // Beyond the end of the declared disk.
    w.append(&LogRecord::Change {
        index: 0,
        change: Change::Zero {
            offset: 1 << 20,
            len: 512,
        },
    })
    .unwrap();
    w.finish().unwrap();
    let mut r = LogReader::open(&path).unwrap();
    assert!(r.next_record().unwrap().is_some());
    assert!(r.next_record().unwrap().is_some());
    let err = r.next_record().unwrap_err().to_string();
    assert!(
        err.contains("record 2") && err.contains("beyond the disk size"),
        "{err}"
    );

    // Undeclared disk, and a truncated file.
    let path = dir.path().join("undeclared.fbrwlog");
    let mut w = LogWriter::create(&path).unwrap();
    w.append(&LogRecord::Change {
        index: 3,
        change: Change::Zero {
            offset: 0,
            len: 512,
        },
    })
    .unwrap();
    w.finish().unwrap();
    let err = LogReader::open(&path)
        .unwrap()
        .next_record()
        .unwrap_err()
        .to_string();
    assert!(err.contains("before it is declared"), "{err}");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    let err = LogReader::open(&path)
        .unwrap()
        .next_record()
        .unwrap_err()
        .to_string();
    assert!(err.contains("middle of a record"), "{err}");
}
