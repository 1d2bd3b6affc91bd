//! Appending framed records to FILE, rotating it to FILE.1 … FILE.N by size.
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::format::{header, HEADER_LEN};

pub struct Writer {
    path: PathBuf,
    max_size: Option<u64>,
    keep: u32,
    out: BufWriter<File>,
    /// Bytes in the current file, buffered ones included.
    size: u64,
    /// The current file holds only what `start_file` wrote, so rotating again
    /// would not help a record that is larger than `max_size` by itself.
    fresh: bool,
}

/// Creates (or truncates) a recording file readable by its owner only: it names
/// peers and processes.
fn create(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    // `mode` applies only to a file we create; an existing one keeps its own.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

impl Writer {
    /// Starts FILE with the header. `keep` rotated files are kept beside it.
    pub fn create(path: &Path, max_size: Option<u64>, keep: u32) -> io::Result<Writer> {
        let mut out = BufWriter::with_capacity(64 << 10, create(path)?);
        out.write_all(&header())?;
        Ok(Writer { path: path.to_owned(), max_size, keep, out, size: HEADER_LEN as u64, fresh: true })
    }

    /// Whether `len` more bytes would push the current file past the size bound.
    pub fn is_full(&self, len: usize) -> bool {
        self.max_size.is_some_and(|max| !self.fresh && self.size + len as u64 > max)
    }

    /// Closes FILE as FILE.1 (shifting older ones up, dropping FILE.N) and starts
    /// a new FILE with its header. The caller writes its preamble next.
    pub fn rotate(&mut self) -> io::Result<()> {
        self.out.flush()?;
        // With keep = 0 the new FILE simply replaces the old one.
        if self.keep > 0 {
            for n in (1..self.keep).rev() {
                match std::fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&self.path, rotated(&self.path, 1))?;
        }
        *self = Writer::create(&self.path, self.max_size, self.keep)?;
        Ok(())
    }

    /// Appends one framed record (or preamble record, while `fresh`).
    pub fn write(&mut self, framed: &[u8]) -> io::Result<()> {
        self.out.write_all(framed)?;
        self.size += framed.len() as u64;
        Ok(())
    }

    /// Marks the end of the preamble: later records count towards rotation.
    pub fn preamble_done(&mut self) {
        self.fresh = false;
    }

    /// Hands buffered records to the kernel. Called at every sync, so a recorder
    /// killed by SIGKILL loses at most the last second; the file stays readable
    /// either way, since a torn tail is detected by the reader.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn rotates_by_size_and_keeps_n_files_private() {
        let dir = std::env::temp_dir().join(format!("bt-writer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rec");
        std::fs::write(&path, b"old contents, world-readable").unwrap();
        let mut w = Writer::create(&path, Some(100), 2).unwrap();
        w.preamble_done();
        let mut rotations = 0;
        for i in 0..20u8 {
            let rec = [i; 30];
            if w.is_full(rec.len()) {
                w.rotate().unwrap();
                w.preamble_done();
                rotations += 1;
            }
            w.write(&rec).unwrap();
        }
        w.flush().unwrap();
        assert!(rotations >= 6, "{rotations}");
        for p in [path.clone(), rotated(&path, 1), rotated(&path, 2)] {
            let m = std::fs::metadata(&p).unwrap();
            assert_eq!(m.mode() & 0o777, 0o600, "{}", p.display());
            assert!(m.len() <= 100, "{} has {} bytes", p.display(), m.len());
            assert_eq!(&std::fs::read(&p).unwrap()[..8], b"BLGTRACE");
        }
        assert!(!rotated(&path, 3).exists());
        // The newest file ends with the last record written.
        assert_eq!(std::fs::read(&path).unwrap().last(), Some(&19));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
