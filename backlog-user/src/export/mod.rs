//! Where a live session's counts go besides the terminal: a Prometheus endpoint
//! (`--prometheus`), a session observer like the recorder and the printers.
mod http;
mod prometheus;

pub use prometheus::{parse_listen_addr, Prometheus};
