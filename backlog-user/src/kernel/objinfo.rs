//! BPF_OBJ_GET_INFO_BY_FD and the id lookups of the bpf(2) syscall, for what aya
//! does not expose: programs' skipped runs, links' attachment state.
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;

/// The `info` member of `union bpf_attr` (uapi, stable).
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Fills `info` (a uapi `bpf_*_info`, plain old data) for the object behind `fd`.
pub fn get<T: Copy>(fd: BorrowedFd<'_>, info: &mut T) -> std::io::Result<()> {
    let attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<T>() as u32,
        info: info as *mut T as u64,
    };
    // SAFETY: the attribute names a buffer of info_len bytes that lives across the
    // call; the kernel writes at most that many.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &attr as *const InfoAttr, std::mem::size_of::<InfoAttr>())
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A descriptor of the link with this id (needs CAP_SYS_ADMIN).
pub fn link_by_id(id: u32) -> std::io::Result<OwnedFd> {
    // The `link_id` member of `union bpf_attr`: { link_id u32, next_id u32, open_flags u32 }.
    let attr: [u32; 3] = [id, 0, 0];
    // SAFETY: the attribute is 12 readable bytes that live across the call.
    let rc =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_GET_FD_BY_ID, attr.as_ptr(), std::mem::size_of_val(&attr)) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
}
