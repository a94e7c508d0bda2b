//! Reading the files the host is pointed at (its config file, plugin
//! files): regular files only, and never more than a cap.
//!
//! Owns those two checks and nothing else. A device (`/dev/zero`) would be
//! read without end, and opening a FIFO blocks until something writes to
//! it, so both are refused by their metadata before the file is opened; a
//! file that grows past the cap while it is read is refused too.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// Read `path` whole if it is a regular file (or a link to one) of at most
/// `cap` bytes.
pub fn read_bounded(path: &Path, cap: u64) -> io::Result<Vec<u8>> {
    // Checked before opening: opening a FIFO blocks.
    if !std::fs::metadata(path)?.is_file() {
        return Err(not_regular());
    }
    read_capped(File::open(path)?, cap)
}

/// Read an open `file` whole if it is a regular file of at most `cap`
/// bytes (also when it grows while it is read).
pub fn read_capped(file: File, cap: u64) -> io::Result<Vec<u8>> {
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(not_regular());
    }
    let too_large = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {cap} bytes"),
        )
    };
    if metadata.len() > cap {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(cap.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(too_large());
    }
    Ok(bytes)
}

fn not_regular() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "not a regular file")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bounded_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a");
        std::fs::write(&file, b"12345").unwrap();
        assert_eq!(read_bounded(&file, 5).unwrap(), b"12345");
        let error = read_bounded(&file, 4).unwrap_err();
        assert!(error.to_string().contains("larger than 4 bytes"), "{error}");
        let error = read_bounded(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(error.to_string().contains("not a regular file"), "{error}");
        let error = read_bounded(dir.path(), 1 << 20).unwrap_err();
        assert!(error.to_string().contains("not a regular file"), "{error}");
    }
}
