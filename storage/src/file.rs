//! The file operations durable stores need, and their implementation on real files.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// Largest buffer of zeros written at once when a file cannot punch holes.
const ZERO_CHUNK: usize = 1 << 20;

/// A file a durable store writes: positioned I/O and an explicit durability point.
///
/// Nothing written is durable until [`DurableFile::sync`] returns `Ok`; a store that
/// acknowledges data must sync first.
pub trait DurableFile: Send + Sync + 'static {
    /// Reads exactly `buf.len()` bytes at `offset` (an error if the file is shorter).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes everything written so far durable (`fdatasync`).
    fn sync(&self) -> io::Result<()>;
    /// The file's size in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Sets the file's size (shrinking drops the tail, growing adds zeros).
    fn truncate(&self, len: u64) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read as zeros (within the file's size).
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeros(self, offset, len)
    }

    /// Whether `len` bytes at `offset` are known to be a hole (read as zeros without
    /// reading): sparse disks of terabytes are scanned by skipping them. `false` when
    /// unknown.
    fn is_hole(&self, _offset: u64, _len: u64) -> bool {
        false
    }
}

/// Zeroes a range by writing zeros, a chunk at a time.
fn write_zeros<F: DurableFile + ?Sized>(file: &F, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; (len as usize).min(ZERO_CHUNK)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

impl DurableFile for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }
    /// Punches a hole where the file system supports it (the file stays sparse), else
    /// writes zeros.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        if fallocate(self, punch, offset, len).is_ok() {
            return Ok(());
        }
        write_zeros(self, offset, len)
    }

    /// Asks the file system where the next data after `offset` is (`SEEK_DATA`; the
    /// file position is not used by positioned reads and writes).
    fn is_hole(&self, offset: u64, len: u64) -> bool {
        use rustix::fs::{seek, SeekFrom};
        let Ok(at) = i64::try_from(offset) else {
            return false;
        };
        match seek(self, SeekFrom::Data(at)) {
            Ok(data) => data >= offset.saturating_add(len),
            Err(e) => e == rustix::io::Errno::NXIO,
        }
    }
}

/// Shared handles to a file (a content index reading a journal its replica appends to).
impl<F: DurableFile + ?Sized> DurableFile for Arc<F> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        (**self).truncate(len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).zero_range(offset, len)
    }
    fn is_hole(&self, offset: u64, len: u64) -> bool {
        (**self).is_hole(offset, len)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn real_files_zero_ranges_and_report_short_reads() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        DurableFile::write_at(&f, &[7u8; 16384], 0).unwrap();
        f.zero_range(4096, 8192).unwrap();
        let mut buf = vec![0u8; 16384];
        DurableFile::read_at(&f, &mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|b| *b == 7));
        assert!(buf[4096..12288].iter().all(|b| *b == 0));
        assert!(buf[12288..].iter().all(|b| *b == 7));
        assert_eq!(DurableFile::size(&f).unwrap(), 16384);
        assert!(DurableFile::read_at(&f, &mut buf, 1).is_err());
        // A sparse tail is a hole; data is not.
        f.set_len(64 << 20).unwrap();
        assert!(f.is_hole(32 << 20, 1 << 20));
        assert!(
            f.is_hole(60 << 20, 8 << 20),
            "past the end counts as a hole"
        );
        assert!(!f.is_hole(0, 4096));
    }
}
