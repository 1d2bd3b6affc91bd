//! TCP sockets in LISTEN and SYN_RECV through NETLINK_SOCK_DIAG, the interface `ss` uses.
//!
//! A sock_diag socket answers for the network namespace it was created in, so one is
//! opened per namespace (see `netns.rs`) and then reused from any thread.
use std::io;
use std::net::IpAddr;

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, TCP_LISTEN};
use netlink_packet_sock_diag::inet::{nlas::Nla, ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr};

/// One socket as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SockEntry {
    pub listening: bool,
    pub addr: IpAddr,
    pub port: u16,
    /// LISTEN: accept-queue length (sk_ack_backlog).
    pub rqueue: u32,
    /// LISTEN: accept-queue limit (sk_max_ack_backlog = min(backlog, somaxconn)).
    pub wqueue: u32,
    pub inode: u32,
    /// SK_MEMINFO_DROPS: every listen overflow or SYN-queue drop on this socket bumps it.
    pub drops: Option<u32>,
}

pub struct Diag {
    sock: Socket,
}

/// Receive buffer of one dump: allocated per dump rather than kept per socket, since
/// the live session holds a socket in every namespace.
const RECV_BUF: usize = 64 * 1024;

impl Diag {
    /// Opens a sock_diag socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Diag> {
        let mut sock = Socket::new(NETLINK_SOCK_DIAG)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Diag { sock })
    }

    /// Every TCP listener and pending (SYN_RECV) request in the namespace, IPv4 and IPv6.
    pub fn dump(&mut self) -> io::Result<Vec<SockEntry>> {
        self.dump_states(StateFlags::LISTEN | StateFlags::SYN_RECV)
    }

    /// Every TCP listener in the namespace, IPv4 and IPv6 (no requests: a SYN flood
    /// does not make this dump longer).
    pub fn listeners(&mut self) -> io::Result<Vec<SockEntry>> {
        self.dump_states(StateFlags::LISTEN)
    }

    fn dump_states(&mut self, states: StateFlags) -> io::Result<Vec<SockEntry>> {
        let mut out = Vec::new();
        let mut buf = vec![0; RECV_BUF];
        for family in [AF_INET, AF_INET6] {
            self.dump_family(family, states.clone(), &mut buf, &mut out)?;
        }
        Ok(out)
    }

    fn dump_family(
        &mut self,
        family: u8,
        states: StateFlags,
        buf: &mut [u8],
        out: &mut Vec<SockEntry>,
    ) -> io::Result<()> {
        let mut hdr = NetlinkHeader::default();
        hdr.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let socket_id = if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() };
        let mut req = NetlinkMessage::new(
            hdr,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::SKMEMINFO,
                states,
                socket_id,
            })
            .into(),
        );
        req.finalize();
        let mut bytes = vec![0; req.buffer_len()];
        req.serialize(&mut bytes);
        self.sock.send(&bytes, 0)?;

        loop {
            let n = self.sock.recv(&mut &mut buf[..], 0)?;
            let mut off = 0;
            while off < n {
                let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[off..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag reply: {e}")))?;
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                        let h = &r.header;
                        out.push(SockEntry {
                            listening: h.state == TCP_LISTEN,
                            addr: h.socket_id.source_address,
                            port: h.socket_id.source_port,
                            rqueue: h.recv_queue,
                            wqueue: h.send_queue,
                            inode: h.inode,
                            drops: r.nlas.iter().find_map(|nla| match nla {
                                Nla::MemInfo(m) => Some(m.drops),
                                _ => None,
                            }),
                        });
                    }
                    _ => {}
                }
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                off += len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_own_listener_with_its_limit() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mut d = Diag::open().unwrap();
        let all = d.dump().unwrap();
        let me = all.iter().find(|e| e.listening && e.port == port).expect("own listener in dump");
        assert_eq!(me.addr, "127.0.0.1".parse::<IpAddr>().unwrap());
        // std listens with backlog 128 (capped by somaxconn, which is at least that by default).
        assert!(me.wqueue > 0 && me.wqueue <= 128, "limit {}", me.wqueue);
        assert_eq!(me.rqueue, 0);
        assert!(me.drops.is_some());
        assert_ne!(me.inode, 0);
        assert!(d.listeners().unwrap().iter().all(|e| e.listening));
    }
}
