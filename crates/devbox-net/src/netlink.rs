//! Netlink in-process, instead of `ip` and `nft` processes on the paths a sandbox's start and
//! stop wait for: links, addresses and routes (rtnetlink, messages built with
//! netlink-packet-route), and looking up or deleting a whole nftables table (nfnetlink). A
//! socket acts in the network namespace of the thread that opened it, wherever it is used
//! afterwards.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use nix::sys::socket::{
    AddressFamily as SockFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind,
    recv, send, socket,
};

use crate::NetError;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const HEADER_LEN: usize = 16;

fn os_err(what: &str, errno: nix::Error) -> NetError {
    NetError::Os {
        what: what.to_string(),
        source: std::io::Error::from(errno),
    }
}

/// A netlink socket of one protocol, bound in the namespace of the thread that opened it.
struct Socket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Socket {
    fn open(protocol: SockProtocol) -> Result<Self, NetError> {
        let fd = socket(
            SockFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            protocol,
        )
        .map_err(|e| os_err("opening a netlink socket", e))?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))
            .map_err(|e| os_err("binding a netlink socket", e))?;
        // The kernel answers at once; never wait forever for it.
        nix::sys::socket::setsockopt(
            &fd,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(5, 0),
        )
        .map_err(|e| os_err("setting a netlink socket's timeout", e))?;
        Ok(Socket {
            fd,
            seq: 0,
            buf: vec![0; 1 << 16],
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends `bytes` (one or more messages, sequence numbers from `first` on) and reads
    /// replies until the kernel has answered every sequence number in `acked` (an ack or an
    /// error each). Returns each one's errno (0: done), in the order of `acked`. An error for
    /// another message of the request (an nfnetlink batch's framing) ends it as an error.
    fn exchange(&mut self, bytes: &[u8], first: u32, acked: &[u32]) -> Result<Vec<i32>, NetError> {
        send(self.fd.as_raw_fd(), bytes, MsgFlags::empty())
            .map_err(|e| os_err("sending a netlink request", e))?;
        let mut codes: Vec<Option<i32>> = vec![None; acked.len()];
        while codes.iter().any(Option::is_none) {
            let n = recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty())
                .map_err(|e| os_err("reading a netlink answer", e))?;
            let mut at = 0;
            while at + HEADER_LEN <= n {
                let b = &self.buf[at..n];
                let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
                if len < HEADER_LEN || len > b.len() {
                    break;
                }
                let kind = u16::from_ne_bytes([b[4], b[5]]);
                let seq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
                if kind == NLMSG_ERROR && len >= HEADER_LEN + 4 {
                    let code = i32::from_ne_bytes([b[16], b[17], b[18], b[19]]);
                    if let Some(i) = acked.iter().position(|s| *s == seq) {
                        codes[i] = Some(-code);
                    } else if code != 0 && seq.wrapping_sub(first) <= self.seq.wrapping_sub(first) {
                        return Err(NetError::Os {
                            what: "a netlink request".into(),
                            source: std::io::Error::from_raw_os_error(-code),
                        });
                    }
                } else if kind == NLMSG_DONE
                    && let Some(i) = acked.iter().position(|s| *s == seq)
                {
                    codes[i].get_or_insert(0);
                }
                at += (len + 3) & !3;
            }
        }
        Ok(codes.into_iter().map(|c| c.unwrap_or(0)).collect())
    }
}

/// An rtnetlink socket: links, addresses and routes of one network namespace.
pub(crate) struct Rtnl(Socket);

/// One change, and the errno that counts as done already (EEXIST for an add, ENODEV for a
/// delete), if any.
type Change = (RouteNetlinkMessage, u16, Option<i32>, &'static str);

impl Rtnl {
    /// Opens one in the calling thread's network namespace.
    pub(crate) fn open() -> Result<Self, NetError> {
        Socket::open(SockProtocol::NetlinkRoute).map(Rtnl)
    }

    /// Sends every change in one write and waits for their acks; the first failure is the
    /// error (the kernel still tries the ones after it).
    fn apply(&mut self, changes: Vec<Change>) -> Result<(), NetError> {
        let mut bytes = Vec::new();
        let mut seqs = Vec::new();
        let first = self.0.seq.wrapping_add(1);
        for (msg, flags, _, _) in &changes {
            let seq = self.0.next_seq();
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
            header.sequence_number = seq;
            let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg.clone()));
            m.finalize();
            let start = bytes.len();
            bytes.resize(start + m.buffer_len(), 0);
            m.serialize(&mut bytes[start..]);
            seqs.push(seq);
        }
        let codes = self.0.exchange(&bytes, first, &seqs)?;
        for ((_, _, ok, what), code) in changes.iter().zip(codes) {
            if code != 0 && Some(code) != *ok {
                return Err(NetError::Os {
                    what: (*what).to_string(),
                    source: std::io::Error::from_raw_os_error(code),
                });
            }
        }
        Ok(())
    }

    /// Sets a link up (by index; loopback is 1 in every namespace).
    pub(crate) fn up(&mut self, index: u32) -> Result<(), NetError> {
        self.apply(vec![up(index)])
    }

    /// Makes a veth pair: `name` here, `peer` in the namespace of `peer_netns` (an open
    /// namespace file), both down.
    pub(crate) fn add_veth(
        &mut self,
        name: &str,
        peer: &str,
        peer_netns: RawFd,
    ) -> Result<(), NetError> {
        let mut p = LinkMessage::default();
        p.attributes = vec![
            LinkAttribute::IfName(peer.to_string()),
            LinkAttribute::NetNsFd(peer_netns),
        ];
        let mut m = LinkMessage::default();
        m.attributes = vec![
            LinkAttribute::IfName(name.to_string()),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))),
            ]),
        ];
        self.apply(vec![(
            RouteNetlinkMessage::NewLink(m),
            NLM_F_CREATE | NLM_F_EXCL,
            None,
            "making a veth pair",
        )])
    }

    /// Gives link `index` the address `addr/prefix`, and with `up` sets it up (one
    /// exchange).
    pub(crate) fn address(
        &mut self,
        index: u32,
        addr: Ipv4Addr,
        prefix: u8,
        up_too: bool,
    ) -> Result<(), NetError> {
        let mut a = AddressMessage::default();
        a.header.family = AddressFamily::Inet;
        a.header.prefix_len = prefix;
        a.header.index = index;
        a.attributes = vec![
            AddressAttribute::Local(addr.into()),
            AddressAttribute::Address(addr.into()),
        ];
        let mut changes = vec![(
            RouteNetlinkMessage::NewAddress(a),
            NLM_F_CREATE | NLM_F_EXCL,
            Some(libc::EEXIST),
            "adding an address",
        )];
        if up_too {
            changes.push(up(index));
        }
        self.apply(changes)
    }

    /// Sets link `index` up and adds a default route through `gateway` on it (one exchange;
    /// an existing route is kept).
    pub(crate) fn up_with_route(&mut self, index: u32, gateway: Ipv4Addr) -> Result<(), NetError> {
        let mut r = RouteMessage::default();
        r.header.address_family = AddressFamily::Inet;
        r.header.table = RouteHeader::RT_TABLE_MAIN;
        r.header.protocol = RouteProtocol::Boot;
        r.header.scope = RouteScope::Universe;
        r.header.kind = RouteType::Unicast;
        r.attributes = vec![
            RouteAttribute::Gateway(RouteAddress::Inet(gateway)),
            RouteAttribute::Oif(index),
        ];
        self.apply(vec![
            up(index),
            (
                RouteNetlinkMessage::NewRoute(r),
                NLM_F_CREATE | NLM_F_EXCL,
                Some(libc::EEXIST),
                "adding the default route",
            ),
        ])
    }

    /// Deletes the link named `name`; nothing when there is none.
    pub(crate) fn delete_link(&mut self, name: &str) -> Result<(), NetError> {
        let mut m = LinkMessage::default();
        m.attributes = vec![LinkAttribute::IfName(name.to_string())];
        self.apply(vec![(
            RouteNetlinkMessage::DelLink(m),
            0,
            Some(libc::ENODEV),
            "deleting a veth",
        )])
    }
}

fn up(index: u32) -> Change {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.header.flags = LinkFlags::Up;
    m.header.change_mask = LinkFlags::Up;
    (
        RouteNetlinkMessage::SetLink(m),
        0,
        None,
        "setting a link up",
    )
}

/// The index of link `name` in the calling thread's namespace; none when there is none.
pub(crate) fn link_index(name: &str) -> Result<Option<u32>, NetError> {
    match nix::net::if_::if_nametoindex(name) {
        Ok(i) => Ok(Some(i)),
        Err(nix::Error::ENODEV) => Ok(None),
        Err(e) => Err(os_err(&format!("looking up the link {name}"), e)),
    }
}

/// nfnetlink: whole nftables tables of family inet, without an `nft` process.
pub(crate) struct Nft(Socket);

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFTA_TABLE_NAME: u16 = 1;
const NFPROTO_INET: u8 = 1;

impl Nft {
    /// Opens one in the calling thread's network namespace.
    pub(crate) fn open() -> Result<Self, NetError> {
        Socket::open(SockProtocol::NetlinkNetFilter).map(Nft)
    }

    /// Appends one nfnetlink message: header, nfgenmsg, and the table name if any.
    fn push(
        bytes: &mut Vec<u8>,
        kind: u16,
        flags: u16,
        seq: u32,
        family: u8,
        res_id: u16,
        table: Option<&str>,
    ) {
        let start = bytes.len();
        bytes.extend_from_slice(&[0; 4]); // length, set below
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&flags.to_ne_bytes());
        bytes.extend_from_slice(&seq.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, version 0, resource id (big-endian).
        bytes.extend_from_slice(&[family, 0]);
        bytes.extend_from_slice(&res_id.to_be_bytes());
        if let Some(name) = table {
            let len = 4 + name.len() + 1;
            bytes.extend_from_slice(&(len as u16).to_ne_bytes());
            bytes.extend_from_slice(&NFTA_TABLE_NAME.to_ne_bytes());
            bytes.extend_from_slice(name.as_bytes());
            bytes.push(0);
            while !bytes.len().is_multiple_of(4) {
                bytes.push(0);
            }
        }
        let len = (bytes.len() - start) as u32;
        bytes[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn check_name(table: &str) -> Result<(), NetError> {
        if table.is_empty()
            || table.len() > 255
            || !table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(NetError::Invalid(format!("nftables table name {table:?}")));
        }
        Ok(())
    }

    /// Whether the table `inet <table>` exists.
    pub(crate) fn has_table(&mut self, table: &str) -> Result<bool, NetError> {
        Self::check_name(table)?;
        let seq = self.0.next_seq();
        let mut bytes = Vec::new();
        Self::push(
            &mut bytes,
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            NFPROTO_INET,
            0,
            Some(table),
        );
        match self.0.exchange(&bytes, seq, &[seq])?[0] {
            0 => Ok(true),
            libc::ENOENT => Ok(false),
            code => Err(NetError::Os {
                what: format!("looking up the nftables table inet {table}"),
                source: std::io::Error::from_raw_os_error(code),
            }),
        }
    }

    /// Deletes the table `inet <table>` and everything in it, in one transaction; nothing
    /// when there is none.
    pub(crate) fn delete_table(&mut self, table: &str) -> Result<(), NetError> {
        Self::check_name(table)?;
        let (begin, del, end) = (self.0.next_seq(), self.0.next_seq(), self.0.next_seq());
        let mut bytes = Vec::new();
        Self::push(
            &mut bytes,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            begin,
            0,
            NFNL_SUBSYS_NFTABLES,
            None,
        );
        Self::push(
            &mut bytes,
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELTABLE,
            NLM_F_REQUEST | NLM_F_ACK,
            del,
            NFPROTO_INET,
            0,
            Some(table),
        );
        Self::push(
            &mut bytes,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            end,
            0,
            NFNL_SUBSYS_NFTABLES,
            None,
        );
        match self.0.exchange(&bytes, begin, &[del])?[0] {
            0 | libc::ENOENT => Ok(()),
            code => Err(NetError::Os {
                what: format!("deleting the nftables table inet {table}"),
                source: std::io::Error::from_raw_os_error(code),
            }),
        }
    }
}
