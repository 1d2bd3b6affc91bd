//! Tracepoint mode: accept() has no tracepoint of its own, so the syscall exit
//! gives the new descriptor and we walk task -> files -> socket -> sock to the child.
//! Misses accepts that bypass accept(2)/accept4(2): io_uring and in-kernel accepts
//! (those children are counted as unmatched when they close, not as waits).
use aya_ebpf::programs::TracePointContext;

use crate::fields;

#[inline(always)]
pub fn on_sys_exit_accept(ctx: &TracePointContext) {
    let off = fields::config().accept_ret_off as usize;
    // SAFETY: offset of the i64 `ret` field in the record (from its format file).
    let Ok(ret) = (unsafe { ctx.read_at::<i64>(off) }) else { return };
    if ret < 0 {
        return;
    }
    let o = fields::offsets();
    super::accepted(fields::current_fd_sock(ret as u64, &o));
}
