//! The kernel's events as types. `decode` is the one place where an event's kind
//! and reason bytes are looked at; everything above it (the model, the renderers,
//! the recorder, the replay of a recording) matches on `What`. `encode` is its
//! inverse, for the recording file, whose event payload is the kernel's layout.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use backlog_common::{DropReason, Event, EventKind, ListenerKey, AF_INET6, COMM_LEN};

/// An address as the kernel reported it: family, 16 address bytes, port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub family: u16,
    pub addr: [u8; 16],
    pub port: u16,
}

impl Endpoint {
    /// As a peer is shown: v4-mapped IPv6 addresses as IPv4, like ss.
    pub fn ip(&self) -> IpAddr {
        ip(self.family, &self.addr)
    }

    /// As a listener's own address is shown: it keeps its family (:: stays ::).
    pub fn own_ip(&self) -> IpAddr {
        match self.ip() {
            IpAddr::V4(a) if self.family == AF_INET6 => IpAddr::V6(a.to_ipv6_mapped()),
            a => a,
        }
    }
}

/// The listening socket an event concerns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerRef {
    /// Kernel address of the socket and its inode: the listener's identity.
    pub key: ListenerKey,
    pub netns: u32,
    pub local: Endpoint,
}

/// A connection dropped at a listener, and the queues when it happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dropped {
    pub reason: DropReason,
    pub peer: Endpoint,
    pub queue_len: u32,
    pub queue_max: u32,
    pub syn_queue_len: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum What {
    Drop(Dropped),
    /// The socket entered LISTEN; `pid`/`comm` called listen() (0 and empty when the
    /// hook could not tell), `requested_backlog` is what it asked for when seen.
    Listen {
        pid: u32,
        comm: [u8; COMM_LEN],
        requested_backlog: Option<u32>,
        queue_max: u32,
    },
    /// It left LISTEN (closed or shut down).
    Unlisten,
    /// A connection was taken off its accept queue after `wait_ns` in it.
    Accept {
        wait_ns: u64,
        queue_len: u32,
    },
    /// A queued connection left the queue without being accepted.
    Abandon,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerEvent {
    /// CLOCK_MONOTONIC ns (see `crate::time::Clock` for wall time).
    pub ts_ns: u64,
    pub listener: ListenerRef,
    pub what: What,
}

/// Why an event could not be decoded: a kind or reason this build does not know
/// (a recording made by a later version; never our own kernel side).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unknown {
    pub kind: u8,
    pub reason: u8,
}

pub fn decode(ev: &Event) -> Result<ListenerEvent, Unknown> {
    let unknown = Unknown { kind: ev.kind, reason: ev.reason };
    let what = match EventKind::from_u8(ev.kind).ok_or(unknown)? {
        EventKind::Drop => What::Drop(Dropped {
            reason: DropReason::from_u8(ev.reason).ok_or(unknown)?,
            peer: Endpoint { family: ev.family, addr: ev.raddr, port: ev.rport },
            queue_len: ev.queue_len,
            queue_max: ev.queue_max,
            syn_queue_len: ev.syn_queue_len,
        }),
        EventKind::Listen => What::Listen {
            pid: ev.pid,
            comm: ev.comm,
            requested_backlog: (ev.requested_backlog != 0).then_some(ev.requested_backlog),
            queue_max: ev.queue_max,
        },
        EventKind::Unlisten => What::Unlisten,
        EventKind::Accept => What::Accept { wait_ns: ev.value, queue_len: ev.queue_len },
        EventKind::Abandon => What::Abandon,
    };
    let listener = ListenerRef {
        key: ListenerKey { sk: ev.sk, ino: ev.sock_ino },
        netns: ev.netns,
        local: Endpoint { family: ev.family, addr: ev.laddr, port: ev.lport },
    };
    Ok(ListenerEvent { ts_ns: ev.ts_ns, listener, what })
}

/// The kernel layout of `e` (fields an event kind does not use are zero).
pub fn encode(e: &ListenerEvent) -> Event {
    let l = &e.listener;
    let mut ev = Event::zeroed();
    ev.ts_ns = e.ts_ns;
    ev.sk = l.key.sk;
    ev.sock_ino = l.key.ino;
    ev.netns = l.netns;
    ev.family = l.local.family;
    ev.laddr = l.local.addr;
    ev.lport = l.local.port;
    match e.what {
        What::Drop(d) => {
            ev.kind = EventKind::Drop as u8;
            ev.reason = d.reason as u8;
            ev.raddr = d.peer.addr;
            ev.rport = d.peer.port;
            ev.queue_len = d.queue_len;
            ev.queue_max = d.queue_max;
            ev.syn_queue_len = d.syn_queue_len;
        }
        What::Listen { pid, comm, requested_backlog, queue_max } => {
            ev.kind = EventKind::Listen as u8;
            ev.pid = pid;
            ev.comm = comm;
            ev.requested_backlog = requested_backlog.unwrap_or(0);
            ev.queue_max = queue_max;
        }
        What::Unlisten => ev.kind = EventKind::Unlisten as u8,
        What::Accept { wait_ns, queue_len } => {
            ev.kind = EventKind::Accept as u8;
            ev.value = wait_ns;
            ev.queue_len = queue_len;
        }
        What::Abandon => ev.kind = EventKind::Abandon as u8,
    }
    ev
}

/// Address bytes as an IP address of `family`; v4-mapped IPv6 shows as IPv4.
pub fn ip(family: u16, bytes: &[u8; 16]) -> IpAddr {
    if family == AF_INET6 {
        let v6 = Ipv6Addr::from(*bytes);
        match v6.to_ipv4_mapped() {
            Some(v4) if bytes[..10].iter().all(|b| *b == 0) && bytes[10] == 0xff => IpAddr::V4(v4),
            _ => IpAddr::V6(v6),
        }
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

/// A NUL-padded kernel task name as text.
pub fn comm_str(c: &[u8]) -> String {
    let end = c.iter().position(|b| *b == 0).unwrap_or(c.len());
    String::from_utf8_lossy(&c[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use backlog_common::AF_INET;

    use super::*;

    fn listener() -> ListenerRef {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        ListenerRef {
            key: ListenerKey { sk: 9, ino: 77 },
            netns: 42,
            local: Endpoint { family: AF_INET, addr, port: 80 },
        }
    }

    #[test]
    fn every_kind_round_trips_through_the_kernel_layout() {
        let mut comm = [0u8; COMM_LEN];
        comm[..5].copy_from_slice(b"nginx");
        let peer = Endpoint { family: AF_INET, addr: [10, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], port: 5555 };
        let whats = [
            What::Drop(Dropped { reason: DropReason::AckOverflow, peer, queue_len: 9, queue_max: 8, syn_queue_len: 3 }),
            What::Listen { pid: 7, comm, requested_backlog: Some(511), queue_max: 128 },
            What::Listen { pid: 0, comm: [0; COMM_LEN], requested_backlog: None, queue_max: 4 },
            What::Unlisten,
            What::Accept { wait_ns: 25_000, queue_len: 2 },
            What::Abandon,
        ];
        for what in whats {
            let e = ListenerEvent { ts_ns: 123, listener: listener(), what };
            assert_eq!(decode(&encode(&e)), Ok(e));
        }
        assert_eq!(comm_str(&comm), "nginx");
    }

    #[test]
    fn unknown_kinds_and_reasons_are_refused() {
        let mut ev = encode(&ListenerEvent { ts_ns: 1, listener: listener(), what: What::Unlisten });
        ev.kind = 99;
        assert_eq!(decode(&ev), Err(Unknown { kind: 99, reason: 0 }));
        ev.kind = EventKind::Drop as u8;
        ev.reason = 200;
        assert!(decode(&ev).is_err());
    }

    #[test]
    fn addresses() {
        let mapped = Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped().octets();
        assert_eq!(ip(AF_INET6, &mapped).to_string(), "10.1.2.3");
        let own = Endpoint { family: AF_INET6, addr: mapped, port: 1 };
        assert_eq!(own.own_ip().to_string(), "::ffff:10.1.2.3");
    }
}
