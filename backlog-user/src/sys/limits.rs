//! Resource limits the tracer raises for itself.
use std::io;

/// RLIMIT_NOFILE's (soft, hard) limits.
pub fn nofile() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Raises RLIMIT_NOFILE's soft limit to its hard limit (what any process may do) and
/// returns the soft limit now in force. The tracer uses no select(2), so fds above
/// 1024 are harmless; what it gains is room for rotations, owner scans and the
/// metrics port's connections under a client that holds many of them.
pub fn raise_nofile() -> io::Result<u64> {
    let (soft, hard) = nofile()?;
    if soft >= hard {
        return Ok(soft);
    }
    let lim = libc::rlimit { rlim_cur: hard, rlim_max: hard };
    // SAFETY: `lim` is valid for reading.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(hard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_reaches_the_hard_one() {
        let raised = raise_nofile().unwrap();
        let (soft, hard) = nofile().unwrap();
        assert_eq!((raised, soft), (hard, hard));
    }
}
