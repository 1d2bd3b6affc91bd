//! The terminal the output goes to: how many columns it has.
use std::os::fd::AsRawFd;

/// Columns of the terminal on stdout; None when stdout is not a terminal (a pipe,
/// a file), whose readers get the default width.
pub fn stdout_columns() -> Option<usize> {
    let fd = std::io::stdout().as_raw_fd();
    // SAFETY: plain syscall on our own descriptor.
    if unsafe { libc::isatty(fd) } != 1 {
        return None;
    }
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes a winsize into the valid pointer given.
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } != 0 || ws.ws_col == 0 {
        return None;
    }
    Some(usize::from(ws.ws_col))
}
