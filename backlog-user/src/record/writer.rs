//! Appending framed records to FILE, rotating it to FILE.1 … FILE.N by size.
//!
//! The recorder runs as root, often in a directory other users can write to (a
//! sticky /tmp). It acts like a careful setuid program: the directory is opened
//! once and every name is resolved in it (`*at` calls), nothing follows a symlink,
//! a file is only ever created with O_EXCL (mode 0600) under a temporary name and
//! renamed into place, and a name that exists already is replaced only when it is a
//! regular file of the effective user holding a recording (or nothing). Anything
//! else there (another user's file, a FIFO, a device, a symlink) is refused with
//! one line and left untouched. In a sticky directory nobody else can rename or
//! remove a name that is ours, so what was checked stays what is replaced; a name
//! found free is taken with RENAME_NOREPLACE, never clobbering what appeared since.
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::format::{header, MAGIC};

pub struct Writer {
    /// The directory holding FILE, opened once.
    dir: OwnedFd,
    /// FILE as given, for messages.
    path: PathBuf,
    /// FILE's name in `dir`.
    name: OsString,
    max_size: Option<u64>,
    keep: u32,
    out: BufWriter<File>,
    /// Bytes in the current file, buffered ones included.
    size: u64,
    /// The temporary name the current file has until `commit` renames it to FILE.
    pending: Option<OsString>,
}

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))
}

fn refused(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, msg)
}

fn euid() -> u32 {
    // SAFETY: plain syscall.
    unsafe { libc::geteuid() }
}

fn kind_of(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "a regular file",
        libc::S_IFDIR => "a directory",
        libc::S_IFLNK => "a symlink",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFSOCK => "a socket",
        _ => "a special file",
    }
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: `st` is written by the kernel before it is read.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// lstat of `name` in `dir`; None when there is nothing by that name.
fn stat_at(dir: RawFd, name: &CStr) -> io::Result<Option<libc::stat>> {
    // SAFETY: as in `fstat`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::NotFound { Ok(None) } else { Err(e) };
    }
    Ok(Some(st))
}

fn open_at(dir: RawFd, name: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd returned is ours alone.
    let fd =
        unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC | libc::O_NOFOLLOW, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn rotated(name: &OsStr, n: u32) -> OsString {
    let mut s = name.to_owned();
    s.push(format!(".{n}"));
    s
}

/// Whether `name` in `dir` may be replaced: Ok(false) when free, Ok(true) when it is
/// a regular file of ours that is empty or holds a recording; refused otherwise.
/// `shown` is the path named in the message.
fn replaceable(dir: RawFd, name: &OsStr, shown: &Path) -> io::Result<bool> {
    let c = cstr(name)?;
    let Some(st) = stat_at(dir, &c)? else { return Ok(false) };
    let what = |st: &libc::stat| format!("{} owned by uid {}", kind_of(st.st_mode), st.st_uid);
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_uid != euid() {
        return Err(refused(format!(
            "{} is {}, not a recording of uid {}: refusing to touch it",
            shown.display(),
            what(&st),
            euid()
        )));
    }
    // Opened without following a link and without blocking, and checked again
    // through the descriptor: what is read is what was checked.
    let fd = open_at(dir, &c, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY, 0)?;
    let st = fstat(fd.as_raw_fd())?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_uid != euid() {
        return Err(refused(format!("{} is {}: refusing to touch it", shown.display(), what(&st))));
    }
    let mut head = [0u8; 8];
    let n = File::from(fd).read(&mut head)?;
    if n > 0 && (n < MAGIC.len() || &head != MAGIC) {
        return Err(refused(format!(
            "{} exists and is not a backlog-trace recording: refusing to replace it",
            shown.display()
        )));
    }
    Ok(true)
}

/// Renames `from` to `to` in `dir`, `to` being free or a recording of ours (checked
/// just before); a name that is taken in between is not replaced.
fn place(dir: RawFd, from: &OsStr, to: &OsStr, shown: &Path) -> io::Result<()> {
    let (cf, ct) = (cstr(from)?, cstr(to)?);
    let taken = replaceable(dir, to, shown)?;
    // SAFETY: plain syscalls on names in `dir`.
    let r = if taken {
        unsafe { libc::renameat(dir, cf.as_ptr(), dir, ct.as_ptr()) }
    } else {
        let r = unsafe { libc::renameat2(dir, cf.as_ptr(), dir, ct.as_ptr(), libc::RENAME_NOREPLACE) };
        if r != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            // A filesystem without RENAME_NOREPLACE: link(2) never replaces either.
            if unsafe { libc::linkat(dir, cf.as_ptr(), dir, ct.as_ptr(), 0) } != 0 {
                -1
            } else {
                unsafe { libc::unlinkat(dir, cf.as_ptr(), 0) }
            }
        } else {
            r
        }
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::AlreadyExists {
            return Err(refused(format!("{} appeared while rotating: refusing to replace it", shown.display())));
        }
        return Err(e);
    }
    Ok(())
}

/// Creates a new file readable by its owner only (it names peers and processes)
/// under a fresh temporary name in `dir`; returns the file and the name.
fn create_temp(dir: RawFd, name: &OsStr) -> io::Result<(File, OsString)> {
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    for attempt in 0..32u32 {
        let mut tmp = OsString::from(".");
        tmp.push(name);
        tmp.push(format!(".{}.{:x}.tmp", std::process::id(), stamp.wrapping_add(attempt.wrapping_mul(0x9e37_79b9))));
        let c = cstr(&tmp)?;
        let fd = match open_at(dir, &c, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o600) {
            // Someone else holds that name: take another.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            r => r?,
        };
        let st = fstat(fd.as_raw_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_uid != euid() || st.st_nlink != 1 {
            return Err(refused(format!("{} is not a new private file", tmp.to_string_lossy())));
        }
        // The umask may have narrowed the mode; the owner reads and writes it.
        // SAFETY: plain syscall on our own descriptor.
        if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } != 0 {
            return Err(io::Error::last_os_error());
        }
        return Ok((File::from(fd), tmp));
    }
    Err(io::Error::new(io::ErrorKind::AlreadyExists, "no free temporary name beside the recording"))
}

impl Writer {
    /// Starts a new file with the header, beside FILE under a temporary name: FILE
    /// itself (and FILE.1 … FILE.`keep`) is only checked now, and replaced at
    /// `commit`. Refuses a FILE or FILE.n that is not free or a recording of ours.
    pub fn create(path: &Path, max_size: Option<u64>, keep: u32) -> io::Result<Writer> {
        let name = match path.file_name() {
            Some(n) if !path.as_os_str().as_bytes().ends_with(b"/") => n.to_owned(),
            _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} names no file", path.display()))),
        };
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let cdir = cstr(parent.as_os_str())?;
        // SAFETY: plain syscall; the fd returned is ours alone.
        let fd = unsafe { libc::open(cdir.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let dir = unsafe { OwnedFd::from_raw_fd(fd) };
        replaceable(dir.as_raw_fd(), &name, path)?;
        for n in 1..=keep {
            let shown = PathBuf::from(rotated(path.as_os_str(), n));
            replaceable(dir.as_raw_fd(), &rotated(&name, n), &shown)?;
        }
        let (file, tmp) = create_temp(dir.as_raw_fd(), &name)?;
        let mut w = Writer {
            dir,
            path: path.to_owned(),
            name,
            max_size,
            keep,
            out: BufWriter::with_capacity(64 << 10, file),
            size: 0,
            pending: Some(tmp),
        };
        w.write(&header())?;
        Ok(w)
    }

    /// Renames the new file into place as FILE (replacing a previous recording):
    /// called once the session is really recording. Until then FILE is untouched,
    /// and dropping the writer removes the new file.
    pub fn commit(&mut self) -> io::Result<()> {
        let Some(tmp) = self.pending.take() else { return Ok(()) };
        self.out.flush()?;
        let r = place(self.dir.as_raw_fd(), &tmp, &self.name, &self.path);
        if r.is_err() {
            self.pending = Some(tmp);
        }
        r
    }

    /// The size bound, if any.
    pub fn max_size(&self) -> Option<u64> {
        self.max_size
    }

    /// Rotated files kept (--rotate).
    pub fn keep(&self) -> u32 {
        self.keep
    }

    /// Whether `len` more bytes still fit in the current file.
    pub fn fits(&self, len: usize) -> bool {
        self.max_size.is_none_or(|max| self.size + len as u64 <= max)
    }

    /// Closes FILE as FILE.1 (shifting older ones up, dropping FILE.N) and starts
    /// a new FILE with its header. The caller writes its preamble next. The new
    /// file is made aside and renamed into place, each name checked as at `create`.
    pub fn rotate(&mut self) -> io::Result<()> {
        self.commit()?;
        self.out.flush()?;
        let dir = self.dir.as_raw_fd();
        let (file, tmp) = create_temp(dir, &self.name)?;
        let shift = || -> io::Result<()> {
            // With keep = 0 the new FILE simply replaces the old one.
            if self.keep > 0 {
                for n in (1..self.keep).rev() {
                    let from = rotated(&self.name, n);
                    let shown = PathBuf::from(rotated(self.path.as_os_str(), n));
                    // Only ever our own recordings move.
                    if replaceable(dir, &from, &shown)? {
                        let to = PathBuf::from(rotated(self.path.as_os_str(), n + 1));
                        place(dir, &from, &rotated(&self.name, n + 1), &to)?;
                    }
                }
                if replaceable(dir, &self.name, &self.path)? {
                    let to = PathBuf::from(rotated(self.path.as_os_str(), 1));
                    place(dir, &self.name, &rotated(&self.name, 1), &to)?;
                }
            }
            place(dir, &tmp, &self.name, &self.path)
        };
        if let Err(e) = shift() {
            // SAFETY: plain syscall on a name we created.
            if let Ok(c) = cstr(&tmp) {
                unsafe { libc::unlinkat(dir, c.as_ptr(), 0) };
            }
            return Err(e);
        }
        self.out = BufWriter::with_capacity(64 << 10, file);
        self.size = 0;
        self.write(&header())
    }

    /// Appends one framed record.
    pub fn write(&mut self, framed: &[u8]) -> io::Result<()> {
        self.out.write_all(framed)?;
        self.size += framed.len() as u64;
        Ok(())
    }

    /// Hands buffered records to the kernel. Called at every sync, so a recorder
    /// killed by SIGKILL loses at most the last second; the file stays readable
    /// either way, since a torn tail is detected by the reader.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl Drop for Writer {
    /// A recording never committed (the session failed to start) leaves nothing:
    /// its temporary file goes, and FILE keeps what it held.
    fn drop(&mut self) {
        if let Some(tmp) = self.pending.take() {
            if let Ok(c) = cstr(&tmp) {
                // SAFETY: plain syscall on a name we created.
                unsafe { libc::unlinkat(self.dir.as_raw_fd(), c.as_ptr(), 0) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bt-writer-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    fn write_rotating(w: &mut Writer, records: u8) -> u32 {
        let mut rotations = 0;
        for i in 0..records {
            let rec = [i; 30];
            if !w.fits(rec.len()) {
                w.rotate().unwrap();
                rotations += 1;
            }
            w.write(&rec).unwrap();
        }
        w.flush().unwrap();
        rotations
    }

    #[test]
    fn rotates_by_size_and_keeps_n_files_private() {
        let dir = scratch("rotate");
        let path = dir.join("rec");
        let old = [&header()[..], b"an older recording"].concat();
        std::fs::write(&path, &old).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut w = Writer::create(&path, Some(100), 2).unwrap();
        w.commit().unwrap();
        let rotations = write_rotating(&mut w, 20);
        assert!(rotations >= 6, "{rotations}");
        for p in [path.clone(), dir.join("rec.1"), dir.join("rec.2")] {
            let m = std::fs::metadata(&p).unwrap();
            assert_eq!(m.mode() & 0o777, 0o600, "{}", p.display());
            assert!(m.len() <= 100, "{} has {} bytes", p.display(), m.len());
            assert_eq!(&std::fs::read(&p).unwrap()[..8], b"BLGTRACE");
        }
        assert_eq!(entries(&dir), ["rec", "rec.1", "rec.2"], "no temporary file left, --rotate 2 kept");
        // The newest file ends with the last record written.
        assert_eq!(std::fs::read(&path).unwrap().last(), Some(&19));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_uncommitted_recording_leaves_the_previous_one_byte_identical() {
        let dir = scratch("uncommitted");
        let path = dir.join("rec");
        let old = [&header()[..], b"the previous incident"].concat();
        std::fs::write(&path, &old).unwrap();
        let mut w = Writer::create(&path, None, 0).unwrap();
        w.write(b"new records").unwrap();
        w.flush().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), old, "FILE untouched before commit");
        assert_eq!(entries(&dir).len(), 2, "the new file waits beside it: {:?}", entries(&dir));
        drop(w);
        assert_eq!(std::fs::read(&path).unwrap(), old);
        assert_eq!(entries(&dir), ["rec"]);
        // Committed, it replaces the old one.
        let mut w = Writer::create(&path, None, 0).unwrap();
        w.write(b"new").unwrap();
        w.commit().unwrap();
        drop(w);
        assert_eq!(std::fs::read(&path).unwrap(), [&header()[..], b"new"].concat());
        assert_eq!(entries(&dir), ["rec"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_anything_but_a_recording_of_ours_and_leaves_it_untouched() {
        let dir = scratch("refuse");
        let target = dir.join("target");
        std::fs::write(&target, b"precious").unwrap();
        let fifo = dir.join("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
        let link = dir.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let foreign = dir.join("foreign");
        std::fs::write(&foreign, b"not a recording").unwrap();
        let sub = dir.join("sub");
        std::fs::create_dir(&sub).unwrap();
        for (p, says) in [
            (&fifo, "a FIFO"),
            (&link, "a symlink"),
            (&foreign, "not a backlog-trace recording"),
            (&sub, "a directory"),
            (&PathBuf::from("/dev/null"), "a character device"),
        ] {
            let Err(e) = Writer::create(p, None, 0) else { panic!("{} accepted", p.display()) };
            let msg = e.to_string();
            assert!(msg.contains(says) && !msg.contains('\n'), "{}: {msg}", p.display());
        }
        // A planted FILE.n is refused too, before anything is written.
        let rec = dir.join("rec");
        std::os::unix::fs::symlink(&target, dir.join("rec.2")).unwrap();
        let e = Writer::create(&rec, Some(4096), 2).map(|_| ()).expect_err("a planted rec.2 refused");
        assert!(e.to_string().contains("rec.2 is a symlink"), "{e}");
        assert!(!rec.exists());
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        assert_eq!(std::fs::read(&foreign).unwrap(), b"not a recording");
        let m = std::fs::metadata("/dev/null").unwrap();
        assert_eq!(m.mode() & 0o777, 0o666, "/dev/null keeps its mode");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_name_planted_during_rotation_is_not_replaced() {
        let dir = scratch("planted");
        let path = dir.join("rec");
        let mut w = Writer::create(&path, Some(100), 2).unwrap();
        w.commit().unwrap();
        write_rotating(&mut w, 2);
        let target = dir.join("target");
        std::fs::write(&target, b"precious").unwrap();
        std::os::unix::fs::symlink(&target, dir.join("rec.1")).unwrap();
        w.write(&[7; 30]).unwrap();
        let e = w.rotate().expect_err("rotation over a planted rec.1 refused");
        assert!(e.to_string().contains("rec.1 is a symlink"), "{e}");
        assert!(std::fs::symlink_metadata(dir.join("rec.1")).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        assert_eq!(entries(&dir), ["rec", "rec.1", "target"], "no temporary file left");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
