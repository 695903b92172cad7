//! Golden bytes of the write-log format (docs/WRITE-LOG-FORMAT.md), and its checks.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use bytes::{Bytes, BytesMut};
use fbr_churn::workload::Change;
use fbr_churn::writelog::{
    decode_record, encode_header, encode_record, scan_log, LogDiskSource, LogItem, LogReader,
    LogRecord, LogTag, LogWriter,
};
use fbr_protocol::StreamId;

#[test]
fn header_and_records() {
    assert_eq!(encode_header(), *b"FBRWLOG1\x02\0\0\0\0\0\0\0");
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
        (
            LogRecord::Tag(LogTag {
                app: true,
                name: "pre-patch".into(),
            }),
            vec![
                4, 2, 9, b'p', b'r', b'e', b'-', b'p', b'a', b't', b'c', b'h',
            ],
        ),
        (
            LogRecord::Tag(LogTag {
                app: false,
                name: String::new(),
            }),
            vec![4, 1, 0],
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

/// A version 1 file (no TAG records) still reads; a TAG in a version 1 file, an unknown
/// tag kind and a name with control characters are refused with the record named.
#[test]
fn version_1_still_reads_and_tags_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let disk = LogRecord::Disk {
        index: 0,
        size: 1 << 20,
        id: StreamId {
            vm: "vm1".into(),
            disk: 0,
        },
    };
    let zero = LogRecord::Change {
        index: 0,
        change: Change::Zero {
            offset: 0,
            len: 512,
        },
    };
    let file = |name: &str, version: u8, records: &[LogRecord], tail: &[u8]| {
        let mut b = BytesMut::new();
        b.extend_from_slice(b"FBRWLOG1");
        b.extend_from_slice(&[version, 0, 0, 0, 0, 0, 0, 0]);
        for r in records {
            encode_record(r, &mut b);
        }
        b.extend_from_slice(tail);
        let path = dir.path().join(name);
        std::fs::write(&path, &b).unwrap();
        path
    };
    let v1 = file("v1.fbrwlog", 1, &[disk.clone(), zero.clone()], &[]);
    let summary = scan_log(&v1).unwrap();
    assert_eq!(
        (summary.version, summary.disks.len(), summary.tags.len()),
        (1, 1, 0)
    );

    let tag = LogRecord::Tag(LogTag {
        app: true,
        name: "t".into(),
    });
    let v1_tag = file("v1-tag.fbrwlog", 1, &[disk.clone(), tag.clone()], &[]);
    let err = scan_log(&v1_tag).unwrap_err().to_string();
    assert!(
        err.contains("record 1") && err.contains("version 1"),
        "{err}"
    );

    for (name, tail, want) in [
        ("kind.fbrwlog", &[4u8, 3, 0][..], "tag kind 3"),
        (
            "name.fbrwlog",
            &[4u8, 1, 2, b'a', 7][..],
            "control characters",
        ),
        ("utf8.fbrwlog", &[4u8, 1, 1, 0xff][..], "not UTF-8"),
    ] {
        let path = file(name, 2, std::slice::from_ref(&disk), tail);
        let err = scan_log(&path).unwrap_err().to_string();
        assert!(
            err.contains("record 1") && err.contains(want),
            "{name}: {err}"
        );
    }

    // A disk's reader meets the tags that follow its declaration, numbered in the log.
    let late = LogRecord::Disk {
        index: 1,
        size: 1 << 20,
        id: StreamId {
            vm: "vm1".into(),
            disk: 1,
        },
    };
    let v2 = file(
        "v2.fbrwlog",
        2,
        &[disk, zero.clone(), tag.clone(), late, tag, zero],
        &[],
    );
    let items = |index| {
        let mut r = LogDiskSource::open(&v2, index).unwrap();
        std::iter::from_fn(|| r.next_item().unwrap()).collect::<Vec<_>>()
    };
    let change = LogItem::Change(Change::Zero {
        offset: 0,
        len: 512,
    });
    assert_eq!(
        items(0),
        vec![change.clone(), LogItem::Tag(1), LogItem::Tag(2), change]
    );
    assert_eq!(items(1), vec![LogItem::Tag(2)]);
}
