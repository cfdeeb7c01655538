//! nf_tables over netlink: one batch (`NFNL_MSG_BATCH_BEGIN` … `END`), which the kernel
//! commits atomically, as `nft -f` does, without the nft process, its parser and its
//! cache (which alone costs ~90 ms per run at 10k services with nft 1.0.6).
//!
//! Everything the full render emits is encoded: tables (with their comment), base and
//! regular chains, named sets and maps (key and data types, concatenations, `typeof`,
//! flags, timeouts, comments), anonymous sets of a rule, elements (intervals,
//! concatenations, verdict and value data), and the expressions of [`Expr`].
//!
//! Encodings follow what nft 1.0.6 sends (checked with `nft --debug=mnl`), userdata
//! included, so the kernel holds the same objects either way and `nft list` prints the
//! same text; `netlink_oracle` (tests) checks that construct by construct.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use ipnet::IpNet;
use svcplane_model::Protocol;

use crate::netlink::{NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, netfilter_socket};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;

const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

// Attribute numbers (linux/netfilter/nf_tables.h).
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_TABLE_USERDATA: u16 = 6;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_TIMEOUT: u16 = 11;
const NFTA_SET_USERDATA: u16 = 13;
const NFTA_SET_DESC_SIZE: u16 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_CONSTANT: u32 = 0x2;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_MAP: u32 = 0x8;
const NFT_SET_TIMEOUT: u32 = 0x10;
const NFT_SET_EVAL: u32 = 0x20;
const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
/// NFTA_SET_DATA_TYPE of a verdict map.
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;

const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_REG_2: u32 = 2;

const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;
const NFT_RETURN: i32 = -5;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;

/// The register nft puts the `slot`-th 32-bit word of a (concatenated) value in: a
/// 16-byte register where one starts (`NFT_REG_1` …), a 32-bit one otherwise.
pub fn reg(slot: u32) -> u32 {
    if slot.is_multiple_of(4) {
        NFT_REG_1 + slot / 4
    } else {
        8 + slot // NFT_REG32_00 + slot
    }
}

/// A netlink failure: the socket, or the kernel refusing the batch (then nothing of
/// it was applied).
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    #[error("the kernel refused the nf_tables batch: {0}")]
    Refused(io::Error),
    #[error("malformed netlink reply")]
    Malformed,
    #[error("the kernel did not confirm the nf_tables batch")]
    Unconfirmed,
}

/// A verdict as map data or an immediate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Jump(String),
    Goto(String),
    Drop,
    Return,
}

/// The table family of `ip`.
pub fn family_of(ip: &IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => NFPROTO_IPV4,
        IpAddr::V6(_) => NFPROTO_IPV6,
    }
}

pub fn family_code(ipv6: bool) -> u8 {
    if ipv6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 }
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

/// One element key or value in nft's layout: each field of a concatenation padded to
/// 4 bytes (`ipv4_addr . inet_proto . inet_service` is 12 bytes).
#[derive(Debug, Default, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key(Vec<u8>);

impl Key {
    pub fn ip(mut self, ip: &IpAddr) -> Key {
        self.0.extend(ip_bytes(ip));
        self
    }
    pub fn proto(mut self, p: Protocol) -> Key {
        self.0.extend([proto_number(p), 0, 0, 0]);
        self
    }
    pub fn port(mut self, port: u16) -> Key {
        self.0.extend(port.to_be_bytes());
        self.0.extend([0, 0]);
        self
    }
    /// A `numgen` result (host byte order, as the expression writes its register).
    pub fn bucket(mut self, n: u32) -> Key {
        self.0.extend(n.to_ne_bytes());
        self
    }
}

/// One set element: its key, its data (maps) and whether it closes an interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elem {
    pub key: Key,
    pub data: Option<ElemData>,
    pub interval_end: bool,
    /// Starts an interval that reaches the end of the address space (nft records it in
    /// the element's userdata, to list it as a prefix).
    pub interval_open: bool,
}

impl Elem {
    pub fn key(key: Key) -> Elem {
        Elem {
            key,
            data: None,
            interval_end: false,
            interval_open: false,
        }
    }
    pub fn verdict(key: Key, v: Verdict) -> Elem {
        Elem {
            key,
            data: Some(ElemData::Verdict(v)),
            interval_end: false,
            interval_open: false,
        }
    }
    pub fn value(key: Key, value: Key) -> Elem {
        Elem {
            key,
            data: Some(ElemData::Value(value)),
            interval_end: false,
            interval_open: false,
        }
    }
}

/// A map element's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElemData {
    Verdict(Verdict),
    Value(Key),
}

/// The elements of an interval set holding `nets` (sorted, not overlapping, as
/// `IpNet::aggregate` leaves them), as nft sends them: a start element per network and
/// an end element (flagged) just past it, or, for a network reaching the end of the
/// address space, a start flagged open. `leading_end`: nft opens an anonymous set with
/// an end element at the zero address when the first network does not start there.
pub fn intervals(nets: &[IpNet], leading_end: bool) -> Vec<Elem> {
    let mut out = Vec::with_capacity(nets.len() * 2 + 1);
    if let Some(first) = nets.first()
        && leading_end
    {
        let start = ip_bytes(&first.network());
        if start.iter().any(|b| *b != 0) {
            out.push(Elem {
                interval_end: true,
                ..Elem::key(Key(vec![0; start.len()]))
            });
        }
    }
    for net in nets {
        let start = Key(ip_bytes(&net.network()));
        match next_address(&net.broadcast()) {
            Some(end) => {
                out.push(Elem::key(start));
                out.push(Elem {
                    interval_end: true,
                    ..Elem::key(Key(end))
                });
            }
            None => out.push(Elem {
                interval_open: true,
                ..Elem::key(start)
            }),
        }
    }
    out
}

/// The address after `ip`, `None` past the last one.
fn next_address(ip: &IpAddr) -> Option<Vec<u8>> {
    let mut b = ip_bytes(ip);
    for byte in b.iter_mut().rev() {
        if *byte == 0xff {
            *byte = 0;
        } else {
            *byte += 1;
            return Some(b);
        }
    }
    None
}

/// One field of a set's key or a map's data: its nft datatype and, for sets declared
/// with `typeof`, the expression nft records for `nft list` to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `type ipv4_addr` / `ipv6_addr`.
    Addr { v6: bool },
    /// `type inet_proto`.
    Proto,
    /// `type inet_service`.
    Service,
    /// `typeof ip|ip6 saddr|daddr`.
    TypeofAddr { v6: bool, source: bool },
    /// `typeof tcp|udp|sctp dport` (`None`: `th dport`).
    TypeofDport(Option<Protocol>),
    /// `typeof numgen random mod N` (the modulus is not part of the type).
    TypeofNumgen,
}

// nft's datatype numbers (src/datatype.h: enum datatypes).
const TYPE_INTEGER: u32 = 4;
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_BITS: u32 = 6;
// nft's expression types recorded in `typeof` userdata (src/expression.h).
const EXPR_VERDICT: u32 = 1;
const EXPR_PAYLOAD: u32 = 7;
const EXPR_CONCAT: u32 = 13;
const EXPR_NUMGEN: u32 = 23;
// nft's byte orders (userdata KEYBYTEORDER/DATABYTEORDER).
const BYTEORDER_INVALID: u32 = 0;
const BYTEORDER_HOST: u32 = 1;
const BYTEORDER_BIG: u32 = 2;
// libnftnl's set userdata types.
const UDATA_SET_KEYBYTEORDER: u8 = 0;
const UDATA_SET_DATABYTEORDER: u8 = 1;
const UDATA_SET_MERGE_ELEMENTS: u8 = 2;
const UDATA_SET_KEY_TYPEOF: u8 = 3;
const UDATA_SET_DATA_TYPEOF: u8 = 4;
const UDATA_SET_DATA_INTERVAL: u8 = 6;
const UDATA_SET_COMMENT: u8 = 7;
// libnftnl's set element userdata: flags, with an interval's open end.
const UDATA_SET_ELEM_FLAGS: u8 = 1;
const SET_ELEM_F_INTERVAL_OPEN: u32 = 1;
/// The comment of a table, a rule (NFTNL_UDATA_*_COMMENT).
const UDATA_COMMENT: u8 = 0;

impl Field {
    fn datatype(self) -> u32 {
        match self {
            Field::Addr { v6: false } | Field::TypeofAddr { v6: false, .. } => TYPE_IPADDR,
            Field::Addr { v6: true } | Field::TypeofAddr { v6: true, .. } => TYPE_IP6ADDR,
            Field::Proto => TYPE_INET_PROTOCOL,
            Field::Service | Field::TypeofDport(_) => TYPE_INET_SERVICE,
            Field::TypeofNumgen => TYPE_INTEGER,
        }
    }

    /// Bytes in a key (before padding).
    fn len(self) -> u32 {
        match self {
            Field::Addr { v6 } | Field::TypeofAddr { v6, .. } => {
                if v6 {
                    16
                } else {
                    4
                }
            }
            Field::Proto => 1,
            Field::Service | Field::TypeofDport(_) => 2,
            Field::TypeofNumgen => 4,
        }
    }

    fn byteorder(self) -> u32 {
        match self {
            Field::TypeofNumgen => BYTEORDER_HOST,
            _ => BYTEORDER_BIG,
        }
    }

    fn is_typeof(self) -> bool {
        matches!(
            self,
            Field::TypeofAddr { .. } | Field::TypeofDport(_) | Field::TypeofNumgen
        )
    }

    /// nft's `typeof` record of this field's expression: its type, then its data.
    fn typeof_udata(self, u: &mut Udata) {
        // Payload: protocol description and template field (src/proto.h).
        let (expr, data): (u32, [(u8, u32); 3]) = match self {
            Field::TypeofAddr { v6, source } => {
                let (desc, field) = match (v6, source) {
                    (false, true) => (12, 11),  // PROTO_DESC_IP, IPHDR_SADDR
                    (false, false) => (12, 12), // IPHDR_DADDR
                    (true, true) => (13, 8),    // PROTO_DESC_IP6, IP6HDR_SADDR
                    (true, false) => (13, 9),   // IP6HDR_DADDR
                };
                (EXPR_PAYLOAD, [(0, desc), (1, field), (0xff, 0)])
            }
            Field::TypeofDport(p) => {
                let desc = match p {
                    Some(Protocol::Tcp) => 8,   // PROTO_DESC_TCP
                    Some(Protocol::Udp) => 6,   // PROTO_DESC_UDP
                    Some(Protocol::Sctp) => 10, // PROTO_DESC_SCTP
                    None => 11,                 // PROTO_DESC_TH
                };
                (EXPR_PAYLOAD, [(0, desc), (1, 2), (0xff, 0)]) // *HDR_DPORT
            }
            // NFT_NG_RANDOM, modulus 1, offset 0: what `numgen random mod 1` records.
            Field::TypeofNumgen => (EXPR_NUMGEN, [(0, 1), (1, 1), (2, 0)]),
            _ => return,
        };
        u.u32(0, expr);
        u.nest(1, |u| {
            for (ty, v) in data {
                if ty != 0xff {
                    u.u32(ty, v);
                }
            }
        });
    }
}

/// A set's key or a map's data as a whole: its (concatenated) type, length, byte order.
fn fields_type(fields: &[Field]) -> (u32, u32, u32) {
    let ty = fields
        .iter()
        .fold(0, |acc, f| (acc << TYPE_BITS) | f.datatype());
    let byteorder = match fields {
        [one] => one.byteorder(),
        _ => BYTEORDER_INVALID,
    };
    let len = match fields {
        [one] => one.len(),
        many => many.iter().map(|f| f.len().next_multiple_of(4)).sum(),
    };
    (ty, len, byteorder)
}

/// nft's `typeof` record of a key or data: the field's own, or a concatenation of
/// them. A concatenation declared with `type` records an empty one.
fn typeof_udata(fields: &[Field], u: &mut Udata) {
    match fields {
        [one] => one.typeof_udata(u),
        many => {
            u.u32(0, EXPR_CONCAT);
            u.nest(1, |u| {
                if many.iter().all(|f| f.is_typeof()) {
                    for (i, f) in many.iter().enumerate() {
                        u.nest(i as u8, |u| f.typeof_udata(u));
                    }
                }
            });
        }
    }
}

/// What a map maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetData {
    Verdict,
    Fields(Vec<Field>),
}

/// A set or map declaration (`add set|map <family> <table> NAME { … }`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    pub name: String,
    pub key: Vec<Field>,
    pub data: Option<SetData>,
    /// `flags interval`.
    pub interval: bool,
    /// `flags dynamic,timeout ; timeout Ns`.
    pub timeout_secs: Option<u64>,
    pub comment: Option<String>,
}

impl SetSpec {
    pub fn new(name: impl Into<String>, key: Vec<Field>) -> SetSpec {
        SetSpec {
            name: name.into(),
            key,
            data: None,
            interval: false,
            timeout_secs: None,
            comment: None,
        }
    }
}

/// nft's TLV userdata (libnftnl's `nftnl_udata`): type, length, value; nests are TLVs
/// of TLVs.
#[derive(Default)]
struct Udata(Vec<u8>);

impl Udata {
    fn put(&mut self, ty: u8, value: &[u8]) {
        self.0.push(ty);
        self.0.push(value.len() as u8);
        self.0.extend(value);
    }
    fn u32(&mut self, ty: u8, v: u32) {
        self.put(ty, &v.to_ne_bytes());
    }
    fn strz(&mut self, ty: u8, s: &str) {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.put(ty, &v);
    }
    fn nest(&mut self, ty: u8, f: impl FnOnce(&mut Udata)) {
        let start = self.0.len();
        self.0.extend([ty, 0]);
        f(self);
        self.0[start + 1] = (self.0.len() - start - 2) as u8;
    }
}

/// The userdata nft 1.0.6 attaches to a set (`mnl_nft_set_add`).
fn set_udata(spec: &SetSpec, anonymous: bool) -> Vec<u8> {
    let mut u = Udata::default();
    let (_, _, key_order) = fields_type(&spec.key);
    u.u32(UDATA_SET_KEYBYTEORDER, key_order);
    if let Some(data) = &spec.data {
        let order = match data {
            SetData::Fields(f) => fields_type(f).2,
            SetData::Verdict => BYTEORDER_INVALID,
        };
        u.u32(UDATA_SET_DATABYTEORDER, order);
    }
    if anonymous && spec.interval {
        u.u32(UDATA_SET_MERGE_ELEMENTS, 1);
    }
    let numgen_key = matches!(spec.key.as_slice(), [Field::TypeofNumgen]);
    // A single `type` field needs no record; an anonymous map's numgen key gets none.
    let key_record = match spec.key.as_slice() {
        [one] => one.is_typeof() && !(anonymous && numgen_key),
        _ => true,
    };
    if key_record {
        u.nest(UDATA_SET_KEY_TYPEOF, |u| typeof_udata(&spec.key, u));
    }
    match &spec.data {
        Some(SetData::Fields(f)) if f.iter().all(|f| f.is_typeof()) => {
            u.nest(UDATA_SET_DATA_TYPEOF, |u| typeof_udata(f, u));
        }
        Some(SetData::Verdict) if anonymous => {
            u.nest(UDATA_SET_DATA_TYPEOF, |u| {
                u.u32(0, EXPR_VERDICT);
                u.nest(1, |_| {});
            });
        }
        _ => {}
    }
    if spec.data.is_some() {
        u.u32(UDATA_SET_DATA_INTERVAL, 0);
    }
    if let Some(c) = &spec.comment {
        u.strz(UDATA_SET_COMMENT, c);
    }
    u.0
}

/// A base chain's hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting = 0,
    Input = 1,
    Forward = 2,
    Output = 3,
    Postrouting = 4,
}

impl Hook {
    /// The hook nft calls `name`.
    pub fn named(name: &str) -> Option<Hook> {
        Some(match name {
            "prerouting" => Hook::Prerouting,
            "input" => Hook::Input,
            "forward" => Hook::Forward,
            "output" => Hook::Output,
            "postrouting" => Hook::Postrouting,
            _ => return None,
        })
    }
}

/// A set a lookup names: a named one of the table, or an anonymous one declared with
/// the rule (`ip saddr { a, b }`, `vmap { … }`), sent just before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetRef {
    Named(String),
    Anonymous(Box<AnonymousSet>),
}

/// An anonymous set's declaration (`name` unused) and elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnonymousSet {
    pub spec: SetSpec,
    pub elems: Vec<Elem>,
}

/// One operation of a transaction, in a family's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `add element` / `delete element` (`items`: key, and map data when adding).
    Elements {
        delete: bool,
        family: u8,
        set: &'static str,
        items: Vec<(Key, Option<Verdict>)>,
    },
    /// `add element` / `delete element` of a map whose values are data (`items`: key,
    /// value; the value is not sent when deleting).
    DataElements {
        delete: bool,
        family: u8,
        set: &'static str,
        items: Vec<(Key, Key)>,
    },
    FlushChain {
        family: u8,
        chain: String,
    },
    /// Creates the chain unless it exists.
    AddChain {
        family: u8,
        chain: String,
    },
    AddRule {
        family: u8,
        chain: String,
        exprs: Vec<Expr>,
    },
    DeleteChain {
        family: u8,
        chain: String,
    },
    DeleteSet {
        family: u8,
        set: String,
    },
    /// `add table` (kept with its contents when it exists).
    AddTable {
        family: u8,
        comment: Option<String>,
    },
    /// `flush table`: every chain loses its rules; chains, sets and elements stay.
    FlushTable {
        family: u8,
    },
    /// A base chain, `policy accept` (`add chain … { type … hook … priority … ; }`).
    AddBaseChain {
        family: u8,
        chain: String,
        kind: &'static str,
        hook: Hook,
        priority: i32,
    },
    /// `add set|map` (kept with its elements when it exists).
    AddSet {
        family: u8,
        spec: SetSpec,
    },
    /// `flush set|map`: every element goes.
    FlushSet {
        family: u8,
        set: String,
    },
    /// `add element` of any kind (intervals, value data).
    AddElements {
        family: u8,
        set: String,
        elems: Vec<Elem>,
    },
    /// A rule with a comment (`… comment "…"`).
    AddCommentedRule {
        family: u8,
        chain: String,
        exprs: Vec<Expr>,
        comment: String,
    },
}

/// Where a NEWSETELEM message's element list is cut: a netlink attribute's length is
/// 16 bits.
const ELEMS_MAX_BYTES: usize = 60 * 1024;

/// Builds one batch of nf_tables messages.
pub struct Batch {
    buf: Vec<u8>,
    /// Offsets of open nested attributes.
    open: Vec<usize>,
    /// Offset of the message being written.
    msg_start: usize,
    /// Offset of the last nf_tables message (it asks for the acknowledgement).
    last_msg: Option<usize>,
    seq: u32,
    first_seq: u32,
    /// The next anonymous set's id (NFTA_SET_ID, referenced by its elements and lookup).
    set_id: u32,
}

impl Batch {
    pub fn new(first_seq: u32) -> Batch {
        let mut b = Batch {
            buf: Vec::with_capacity(4096),
            open: Vec::new(),
            msg_start: 0,
            last_msg: None,
            seq: first_seq,
            first_seq,
            set_id: 1,
        };
        b.begin_raw(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES);
        b.end_msg();
        b
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    fn begin_raw(&mut self, ty: u16, flags: u16, family: u8, res_id: u16) {
        self.msg_start = self.buf.len();
        self.buf.extend([0u8; 4]); // length, patched in end_msg
        self.buf.extend(ty.to_ne_bytes());
        self.buf.extend(flags.to_ne_bytes());
        self.buf.extend(self.seq.to_ne_bytes());
        self.buf.extend(0u32.to_ne_bytes()); // port id: the kernel
        self.seq = self.seq.wrapping_add(1);
        // nfgenmsg
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend(res_id.to_be_bytes());
    }

    /// Starts an nf_tables message. Only the batch's last message asks for an
    /// acknowledgement (see [`Batch::finish`]): the kernel reports every failing
    /// message anyway, and an ack per message would overflow the receive buffer of a
    /// full sync (100k+ messages).
    fn begin(&mut self, msg: u16, flags: u16, family: u8) {
        self.last_msg = Some(self.buf.len());
        self.begin_raw(
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_REQUEST | flags,
            family,
            0,
        );
    }

    fn end_msg(&mut self) {
        let len = (self.buf.len() - self.msg_start) as u32;
        self.buf[self.msg_start..self.msg_start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = (4 + data.len()) as u16;
        self.buf.extend(len.to_ne_bytes());
        self.buf.extend(ty.to_ne_bytes());
        self.buf.extend(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn str_attr(&mut self, ty: u16, s: &str) {
        let mut data = Vec::with_capacity(s.len() + 1);
        data.extend(s.as_bytes());
        data.push(0);
        self.attr(ty, &data);
    }

    fn u32_attr(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_be_bytes());
    }

    fn nest(&mut self, ty: u16) {
        self.open.push(self.buf.len());
        self.buf.extend([0u8; 2]);
        self.buf.extend((ty | NLA_F_NESTED).to_ne_bytes());
    }

    fn unnest(&mut self) {
        if let Some(start) = self.open.pop() {
            let len = (self.buf.len() - start) as u16;
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
    }

    fn data_value(&mut self, ty: u16, value: &[u8]) {
        self.nest(ty);
        self.attr(NFTA_DATA_VALUE, value);
        self.unnest();
    }

    fn verdict(&mut self, ty: u16, v: &Verdict) {
        self.nest(ty);
        self.nest(NFTA_DATA_VERDICT);
        let (code, chain) = match v {
            Verdict::Jump(c) => (NFT_JUMP, Some(c.as_str())),
            Verdict::Goto(c) => (NFT_GOTO, Some(c.as_str())),
            Verdict::Drop => (NF_DROP, None),
            Verdict::Return => (NFT_RETURN, None),
        };
        self.attr(NFTA_VERDICT_CODE, &code.to_be_bytes());
        if let Some(c) = chain {
            self.str_attr(NFTA_VERDICT_CHAIN, c);
        }
        self.unnest();
        self.unnest();
    }

    /// `add table <family> <table> [{ comment … }]`.
    pub fn add_table(&mut self, family: u8, table: &str, comment: Option<&str>) {
        self.begin(NFT_MSG_NEWTABLE, NLM_F_CREATE, family);
        self.str_attr(NFTA_TABLE_NAME, table);
        self.u32_attr(NFTA_TABLE_FLAGS, 0);
        if let Some(c) = comment {
            let mut u = Udata::default();
            u.strz(UDATA_COMMENT, c);
            self.attr(NFTA_TABLE_USERDATA, &u.0);
        }
        self.end_msg();
    }

    /// `flush table`: a rule delete naming only the table.
    pub fn flush_table(&mut self, family: u8, table: &str) {
        self.begin(NFT_MSG_DELRULE, 0, family);
        self.str_attr(NFTA_RULE_TABLE, table);
        self.end_msg();
    }

    /// `add chain <family> <table> <name>` (a regular chain; no-op when it exists, an
    /// error when the table does not).
    pub fn add_chain(&mut self, family: u8, table: &str, name: &str) {
        self.begin(NFT_MSG_NEWCHAIN, NLM_F_CREATE, family);
        self.str_attr(NFTA_CHAIN_TABLE, table);
        self.str_attr(NFTA_CHAIN_NAME, name);
        self.end_msg();
    }

    /// A base chain with policy accept.
    pub fn add_base_chain(
        &mut self,
        family: u8,
        table: &str,
        name: &str,
        kind: &str,
        hook: Hook,
        priority: i32,
    ) {
        self.begin(NFT_MSG_NEWCHAIN, NLM_F_CREATE, family);
        self.str_attr(NFTA_CHAIN_TABLE, table);
        self.str_attr(NFTA_CHAIN_NAME, name);
        self.str_attr(NFTA_CHAIN_TYPE, kind);
        self.u32_attr(NFTA_CHAIN_POLICY, NF_ACCEPT as u32);
        self.nest(NFTA_CHAIN_HOOK);
        self.u32_attr(NFTA_HOOK_HOOKNUM, hook as u32);
        self.attr(NFTA_HOOK_PRIORITY, &priority.to_be_bytes());
        self.unnest();
        self.end_msg();
    }

    pub fn delete_chain(&mut self, family: u8, table: &str, name: &str) {
        self.begin(NFT_MSG_DELCHAIN, 0, family);
        self.str_attr(NFTA_CHAIN_TABLE, table);
        self.str_attr(NFTA_CHAIN_NAME, name);
        self.end_msg();
    }

    pub fn delete_set(&mut self, family: u8, table: &str, name: &str) {
        self.begin(NFT_MSG_DELSET, 0, family);
        self.str_attr(NFTA_SET_TABLE, table);
        self.str_attr(NFTA_SET_NAME, name);
        self.end_msg();
    }

    /// `add set|map` of `spec`; returns the set's id in this batch.
    pub fn add_set(&mut self, family: u8, table: &str, spec: &SetSpec) -> u32 {
        self.new_set(family, table, spec, None)
    }

    /// NEWSET; `anonymous`: the element count of a constant anonymous set.
    fn new_set(
        &mut self,
        family: u8,
        table: &str,
        spec: &SetSpec,
        anonymous: Option<usize>,
    ) -> u32 {
        let id = self.set_id;
        self.set_id += 1;
        let mut flags = 0;
        if anonymous.is_some() {
            flags |= NFT_SET_ANONYMOUS | NFT_SET_CONSTANT;
        }
        if spec.interval {
            flags |= NFT_SET_INTERVAL;
        }
        if spec.data.is_some() {
            flags |= NFT_SET_MAP;
        }
        if spec.timeout_secs.is_some() {
            flags |= NFT_SET_TIMEOUT | NFT_SET_EVAL;
        }
        self.begin(NFT_MSG_NEWSET, NLM_F_CREATE, family);
        self.str_attr(NFTA_SET_TABLE, table);
        let name = match anonymous {
            Some(_) if spec.data.is_some() => "__map%d",
            Some(_) => "__set%d",
            None => spec.name.as_str(),
        };
        self.str_attr(NFTA_SET_NAME, name);
        self.u32_attr(NFTA_SET_FLAGS, flags);
        let (key_type, key_len, _) = fields_type(&spec.key);
        self.u32_attr(NFTA_SET_KEY_TYPE, key_type);
        self.u32_attr(NFTA_SET_KEY_LEN, key_len);
        match &spec.data {
            Some(SetData::Verdict) => {
                self.u32_attr(NFTA_SET_DATA_TYPE, NFT_DATA_VERDICT);
                self.u32_attr(NFTA_SET_DATA_LEN, 0);
            }
            Some(SetData::Fields(f)) => {
                let (ty, len, _) = fields_type(f);
                self.u32_attr(NFTA_SET_DATA_TYPE, ty);
                self.u32_attr(NFTA_SET_DATA_LEN, len);
            }
            None => {}
        }
        if let Some(size) = anonymous {
            self.nest(NFTA_SET_DESC);
            self.u32_attr(NFTA_SET_DESC_SIZE, size as u32);
            self.unnest();
        }
        self.u32_attr(NFTA_SET_ID, id);
        if let Some(t) = spec.timeout_secs {
            self.attr(NFTA_SET_TIMEOUT, &(t.saturating_mul(1000)).to_be_bytes());
        }
        self.attr(NFTA_SET_USERDATA, &set_udata(spec, anonymous.is_some()));
        self.end_msg();
        id
    }

    /// `flush set|map`: an element delete naming only the set.
    pub fn flush_set(&mut self, family: u8, table: &str, name: &str) {
        self.begin(NFT_MSG_DELSETELEM, 0, family);
        self.str_attr(NFTA_SET_ELEM_LIST_TABLE, table);
        self.str_attr(NFTA_SET_ELEM_LIST_SET, name);
        self.end_msg();
    }

    /// Append `op` (on `table`).
    pub fn op(&mut self, table: &str, op: &Op) {
        match op {
            Op::Elements {
                delete,
                family,
                set,
                items,
            } => self.elements(*delete, *family, table, set, items),
            Op::DataElements {
                delete,
                family,
                set,
                items,
            } => {
                let elems: Vec<Elem> = items
                    .iter()
                    .map(|(k, v)| match delete {
                        true => Elem::key(k.clone()),
                        false => Elem::value(k.clone(), v.clone()),
                    })
                    .collect();
                let (msg, flags) = match delete {
                    true => (NFT_MSG_DELSETELEM, 0),
                    false => (NFT_MSG_NEWSETELEM, NLM_F_CREATE),
                };
                self.elem_msgs(msg, flags, *family, table, set, None, &elems);
            }
            Op::FlushChain { family, chain } => self.flush_chain(*family, table, chain),
            Op::AddChain { family, chain } => self.add_chain(*family, table, chain),
            Op::AddRule {
                family,
                chain,
                exprs,
            } => self.add_rule(*family, table, chain, exprs, None),
            Op::DeleteChain { family, chain } => self.delete_chain(*family, table, chain),
            Op::DeleteSet { family, set } => self.delete_set(*family, table, set),
            Op::AddTable { family, comment } => self.add_table(*family, table, comment.as_deref()),
            Op::FlushTable { family } => self.flush_table(*family, table),
            Op::AddBaseChain {
                family,
                chain,
                kind,
                hook,
                priority,
            } => self.add_base_chain(*family, table, chain, kind, *hook, *priority),
            Op::AddSet { family, spec } => {
                self.add_set(*family, table, spec);
            }
            Op::FlushSet { family, set } => self.flush_set(*family, table, set),
            Op::AddElements { family, set, elems } => {
                self.add_elements(*family, table, set, None, elems)
            }
            Op::AddCommentedRule {
                family,
                chain,
                exprs,
                comment,
            } => self.add_rule(*family, table, chain, exprs, Some(comment)),
        }
    }

    /// `flush chain`: a rule delete naming only the chain removes all its rules.
    pub fn flush_chain(&mut self, family: u8, table: &str, name: &str) {
        self.begin(NFT_MSG_DELRULE, 0, family);
        self.str_attr(NFTA_RULE_TABLE, table);
        self.str_attr(NFTA_RULE_CHAIN, name);
        self.end_msg();
    }

    /// Append one rule made of `exprs` to a chain; the anonymous sets its lookups use
    /// are declared and filled first (as nft sends them).
    pub fn add_rule(
        &mut self,
        family: u8,
        table: &str,
        chain: &str,
        exprs: &[Expr],
        comment: Option<&str>,
    ) {
        let mut anon_ids = Vec::new();
        for e in exprs {
            if let Expr::Lookup {
                set: SetRef::Anonymous(a),
                ..
            } = e
            {
                let id = self.new_set(family, table, &a.spec, Some(a.elems.len()));
                let name = if a.spec.data.is_some() {
                    "__map%d"
                } else {
                    "__set%d"
                };
                self.add_elements(family, table, name, Some(id), &a.elems);
                anon_ids.push(id);
            }
        }
        self.begin(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, family);
        self.str_attr(NFTA_RULE_TABLE, table);
        self.str_attr(NFTA_RULE_CHAIN, chain);
        self.nest(NFTA_RULE_EXPRESSIONS);
        let mut ids = anon_ids.into_iter();
        for e in exprs {
            self.expr(e, &mut ids);
        }
        self.unnest();
        if let Some(c) = comment {
            let mut u = Udata::default();
            u.strz(UDATA_COMMENT, c);
            self.attr(NFTA_RULE_USERDATA, &u.0);
        }
        self.end_msg();
    }

    /// `add element` (`data` for maps) or, with `delete`, `delete element` (keys only).
    pub fn elements<'k>(
        &mut self,
        delete: bool,
        family: u8,
        table: &str,
        set: &str,
        elements: impl IntoIterator<Item = &'k (Key, Option<Verdict>)>,
    ) {
        let elems: Vec<Elem> = elements
            .into_iter()
            .map(|(key, data)| Elem {
                key: key.clone(),
                data: data
                    .as_ref()
                    .filter(|_| !delete)
                    .map(|v| ElemData::Verdict(v.clone())),
                interval_end: false,
                interval_open: false,
            })
            .collect();
        if delete {
            self.elem_msgs(NFT_MSG_DELSETELEM, 0, family, table, set, None, &elems);
        } else {
            self.add_elements(family, table, set, None, &elems);
        }
    }

    /// NEWSETELEM messages for `elems` (none when empty); `set_id` for an anonymous set.
    fn add_elements(
        &mut self,
        family: u8,
        table: &str,
        set: &str,
        set_id: Option<u32>,
        elems: &[Elem],
    ) {
        self.elem_msgs(
            NFT_MSG_NEWSETELEM,
            NLM_F_CREATE,
            family,
            table,
            set,
            set_id,
            elems,
        );
    }

    /// `elems` in as many messages of type `msg` as their attribute's 16-bit length
    /// needs (nft splits long element lists too).
    #[allow(clippy::too_many_arguments)]
    fn elem_msgs(
        &mut self,
        msg: u16,
        flags: u16,
        family: u8,
        table: &str,
        set: &str,
        set_id: Option<u32>,
        elems: &[Elem],
    ) {
        let mut rest = elems;
        while !rest.is_empty() {
            self.begin(msg, flags, family);
            self.str_attr(NFTA_SET_ELEM_LIST_TABLE, table);
            self.str_attr(NFTA_SET_ELEM_LIST_SET, set);
            if let Some(id) = set_id {
                self.u32_attr(NFTA_SET_ELEM_LIST_SET_ID, id);
            }
            self.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
            let start = self.buf.len();
            while let Some((e, tail)) = rest.split_first() {
                // An element is < 1 KiB (a verdict's chain name is at most 256 bytes).
                if self.buf.len() - start > ELEMS_MAX_BYTES {
                    break;
                }
                self.elem(e);
                rest = tail;
            }
            self.unnest();
            self.end_msg();
        }
    }

    fn elem(&mut self, e: &Elem) {
        self.nest(NFTA_LIST_ELEM);
        if e.interval_end {
            self.u32_attr(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
        }
        self.data_value(NFTA_SET_ELEM_KEY, &e.key.0);
        match &e.data {
            Some(ElemData::Verdict(v)) => self.verdict(NFTA_SET_ELEM_DATA, v),
            Some(ElemData::Value(k)) => self.data_value(NFTA_SET_ELEM_DATA, &k.0),
            None => {}
        }
        if e.interval_open {
            let mut u = Udata::default();
            u.u32(UDATA_SET_ELEM_FLAGS, SET_ELEM_F_INTERVAL_OPEN);
            self.attr(NFTA_SET_ELEM_USERDATA, &u.0);
        }
        self.unnest();
    }

    fn expr(&mut self, e: &Expr, anon_ids: &mut impl Iterator<Item = u32>) {
        self.nest(NFTA_LIST_ELEM);
        self.str_attr(NFTA_EXPR_NAME, e.name());
        self.nest(NFTA_EXPR_DATA);
        match e {
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                self.u32_attr(1, *dreg); // NFTA_PAYLOAD_DREG
                self.u32_attr(2, *base as u32); // BASE
                self.u32_attr(3, *offset); // OFFSET
                self.u32_attr(4, *len); // LEN
            }
            Expr::Cmp { neq, data } => {
                self.u32_attr(1, NFT_REG_1); // NFTA_CMP_SREG
                self.u32_attr(2, u32::from(*neq)); // OP: EQ 0, NEQ 1
                self.data_value(3, data); // DATA
            }
            Expr::Meta { key, dreg } => {
                self.u32_attr(2, *key as u32); // NFTA_META_KEY
                self.u32_attr(1, *dreg); // DREG
            }
            Expr::MetaSet { key } => {
                self.u32_attr(2, *key as u32); // NFTA_META_KEY
                self.u32_attr(3, NFT_REG_1); // SREG
            }
            Expr::Ct { key } => {
                self.u32_attr(2, *key as u32); // NFTA_CT_KEY
                self.u32_attr(1, NFT_REG_1); // DREG
            }
            Expr::Bitwise { mask, xor } => {
                self.u32_attr(1, NFT_REG_1); // NFTA_BITWISE_SREG
                self.u32_attr(2, NFT_REG_1); // DREG
                self.u32_attr(3, mask.len() as u32); // LEN
                self.data_value(4, mask); // MASK
                self.data_value(5, xor); // XOR
            }
            Expr::Fib { source } => {
                // NFTA_FIB_FLAGS: NFTA_FIB_F_SADDR 1 / DADDR 2; RESULT: ADDRTYPE 3.
                self.u32_attr(3, if *source { 1 } else { 2 });
                self.u32_attr(2, 3);
                self.u32_attr(1, NFT_REG_1); // DREG
            }
            Expr::Lookup { set, dreg, inv } => {
                self.u32_attr(2, NFT_REG_1); // NFTA_LOOKUP_SREG
                if let Some(d) = dreg {
                    self.u32_attr(3, *d); // DREG
                }
                match set {
                    SetRef::Named(name) => self.str_attr(1, name), // SET
                    SetRef::Anonymous(a) => {
                        let name = if a.spec.data.is_some() {
                            "__map%d"
                        } else {
                            "__set%d"
                        };
                        self.str_attr(1, name);
                        if let Some(id) = anon_ids.next() {
                            self.u32_attr(4, id); // SET_ID
                        }
                    }
                }
                if *inv {
                    self.u32_attr(5, 1); // FLAGS: NFT_LOOKUP_F_INV
                }
            }
            Expr::NumgenRandom { modulus, dreg } => {
                self.u32_attr(1, *dreg); // NFTA_NG_DREG
                self.u32_attr(2, *modulus); // MODULUS
                self.u32_attr(3, 1); // TYPE: NFT_NG_RANDOM
                self.u32_attr(4, 0); // OFFSET
            }
            Expr::Immediate { reg, data } => {
                self.u32_attr(1, *reg); // NFTA_IMMEDIATE_DREG
                self.data_value(2, data); // DATA
            }
            Expr::ImmediateVerdict(v) => {
                self.u32_attr(1, NFT_REG_VERDICT);
                self.verdict(2, v);
            }
            Expr::DynsetUpdate { set } => {
                self.u32_attr(4, NFT_REG_1); // NFTA_DYNSET_SREG_KEY
                self.u32_attr(3, 1); // OP: NFT_DYNSET_OP_UPDATE
                self.str_attr(1, set); // SET_NAME
            }
            Expr::Dnat {
                family,
                proto_reg,
                flags,
            } => {
                self.u32_attr(1, 1); // NFTA_NAT_TYPE: NFT_NAT_DNAT
                self.u32_attr(2, u32::from(*family)); // FAMILY
                self.u32_attr(3, NFT_REG_1); // REG_ADDR_MIN
                self.u32_attr(5, *proto_reg); // REG_PROTO_MIN
                if let Some(f) = flags {
                    self.u32_attr(7, *f); // FLAGS
                }
            }
            Expr::Reject { code } => {
                self.u32_attr(1, 0); // NFTA_REJECT_TYPE: NFT_REJECT_ICMP_UNREACH
                self.attr(2, &[*code]); // ICMP_CODE
            }
            Expr::Masquerade { fully_random } => {
                if *fully_random {
                    self.u32_attr(1, 0x10); // NFTA_MASQ_FLAGS: NF_NAT_RANGE_PROTO_RANDOM_FULLY
                }
            }
        }
        self.unnest();
        self.unnest();
    }

    /// The finished batch: the last nf_tables message asks for an acknowledgement.
    /// Returns the bytes, the first sequence number and that message's, if any.
    fn finish(mut self) -> (Vec<u8>, u32, Option<u32>) {
        let last = self.last_msg.map(|at| {
            let flags = u16::from_ne_bytes([self.buf[at + 6], self.buf[at + 7]]) | NLM_F_ACK;
            self.buf[at + 6..at + 8].copy_from_slice(&flags.to_ne_bytes());
            u32::from_ne_bytes([
                self.buf[at + 8],
                self.buf[at + 9],
                self.buf[at + 10],
                self.buf[at + 11],
            ])
        });
        self.begin_raw(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES);
        self.end_msg();
        (self.buf, self.first_seq, last)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadBase {
    Network = 1,
    Transport = 2,
}

/// `meta` keys we load or set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaKey {
    Mark = 3,
    L4proto = 16,
}

/// `ct` keys we load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtKey {
    State = 0,
    Status = 2,
}

/// The expressions our rules are made of (always in nft's register layout: values
/// loaded into `NFT_REG_1` and on, see [`reg`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Payload {
        base: PayloadBase,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    Cmp {
        neq: bool,
        data: Vec<u8>,
    },
    Meta {
        key: MetaKey,
        dreg: u32,
    },
    /// `meta KEY set` from `NFT_REG_1`.
    MetaSet {
        key: MetaKey,
    },
    Ct {
        key: CtKey,
    },
    Bitwise {
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    /// `fib saddr|daddr type`.
    Fib {
        source: bool,
    },
    Lookup {
        set: SetRef,
        /// A map's data register (`Some(0)`: a verdict map).
        dreg: Option<u32>,
        inv: bool,
    },
    NumgenRandom {
        modulus: u32,
        dreg: u32,
    },
    Immediate {
        reg: u32,
        data: Vec<u8>,
    },
    ImmediateVerdict(Verdict),
    /// `update @set { <key in NFT_REG_1> }`.
    DynsetUpdate {
        set: String,
    },
    /// `dnat`: the address in `NFT_REG_1`, the port in `proto_reg`.
    Dnat {
        family: u8,
        proto_reg: u32,
        flags: Option<u32>,
    },
    /// `reject with icmp|icmpv6 CODE` (port unreachable: `reject`).
    Reject {
        code: u8,
    },
    Masquerade {
        fully_random: bool,
    },
}

impl Expr {
    fn name(&self) -> &'static str {
        match self {
            Expr::Payload { .. } => "payload",
            Expr::Cmp { .. } => "cmp",
            Expr::Meta { .. } | Expr::MetaSet { .. } => "meta",
            Expr::Ct { .. } => "ct",
            Expr::Bitwise { .. } => "bitwise",
            Expr::Fib { .. } => "fib",
            Expr::Lookup { .. } => "lookup",
            Expr::NumgenRandom { .. } => "numgen",
            Expr::Immediate { .. } | Expr::ImmediateVerdict(_) => "immediate",
            Expr::DynsetUpdate { .. } => "dynset",
            Expr::Dnat { .. } => "nat",
            Expr::Reject { .. } => "reject",
            Expr::Masquerade { .. } => "masq",
        }
    }
}

/// Expression builders in nft's shapes.
pub mod exprs {
    use super::*;

    fn addr_field(source: bool, v6: bool) -> (u32, u32) {
        match (v6, source) {
            (false, true) => (12, 4),
            (false, false) => (16, 4),
            (true, true) => (8, 16),
            (true, false) => (24, 16),
        }
    }

    /// Load `ip|ip6 saddr|daddr` into `dreg`.
    pub fn load_addr(source: bool, v6: bool, dreg: u32) -> Expr {
        let (offset, len) = addr_field(source, v6);
        Expr::Payload {
            base: PayloadBase::Network,
            offset,
            len,
            dreg,
        }
    }

    /// Load the transport header's destination port (`th dport`) into `dreg`.
    pub fn load_dport(dreg: u32) -> Expr {
        Expr::Payload {
            base: PayloadBase::Transport,
            offset: 2,
            len: 2,
            dreg,
        }
    }

    /// `ip daddr X` / `ip6 daddr X` (saddr with `source`).
    pub fn addr_eq(source: bool, ip: &IpAddr) -> [Expr; 2] {
        [
            load_addr(source, ip.is_ipv6(), NFT_REG_1),
            Expr::Cmp {
                neq: false,
                data: ip_bytes(ip),
            },
        ]
    }

    /// `ip saddr|daddr [!=] NET`: a byte-aligned prefix loads only its bytes; another
    /// is masked. `None` for a /0 (nft would not write such a match).
    pub fn net_match(source: bool, net: &IpNet, neq: bool) -> Option<Vec<Expr>> {
        let v6 = matches!(net, IpNet::V6(_));
        let (offset, full) = addr_field(source, v6);
        let prefix = u32::from(net.prefix_len());
        if prefix == 0 {
            return None;
        }
        let addr = ip_bytes(&net.network());
        let mut out = Vec::with_capacity(3);
        if prefix.is_multiple_of(8) {
            let len = prefix / 8;
            out.push(Expr::Payload {
                base: PayloadBase::Network,
                offset,
                len,
                dreg: NFT_REG_1,
            });
            out.push(Expr::Cmp {
                neq,
                data: addr[..len as usize].to_vec(),
            });
        } else {
            out.push(Expr::Payload {
                base: PayloadBase::Network,
                offset,
                len: full,
                dreg: NFT_REG_1,
            });
            let mask = ip_bytes(&net.netmask());
            out.push(Expr::Bitwise {
                xor: vec![0; mask.len()],
                mask,
            });
            out.push(Expr::Cmp { neq, data: addr });
        }
        Some(out)
    }

    /// `ip|ip6 saddr|daddr [!=] { NETS }` as nft writes it: one network is a prefix
    /// match, several an anonymous interval set. `None` when empty or a /0 alone.
    pub fn nets_match(source: bool, v6: bool, nets: &[IpNet], neq: bool) -> Option<Vec<Expr>> {
        match nets {
            [] => None,
            [one] => net_match(source, one, neq),
            many => {
                let mut spec = SetSpec::new("", vec![Field::TypeofAddr { v6, source }]);
                spec.interval = true;
                Some(vec![
                    load_addr(source, v6, NFT_REG_1),
                    Expr::Lookup {
                        set: SetRef::Anonymous(Box::new(AnonymousSet {
                            spec,
                            elems: intervals(many, true),
                        })),
                        dreg: None,
                        inv: neq,
                    },
                ])
            }
        }
    }

    /// `meta l4proto P`.
    pub fn l4proto(p: Protocol) -> [Expr; 2] {
        [
            Expr::Meta {
                key: MetaKey::L4proto,
                dreg: NFT_REG_1,
            },
            Expr::Cmp {
                neq: false,
                data: vec![proto_number(p)],
            },
        ]
    }

    /// `P dport N` (nft's dependency `meta l4proto P` first).
    pub fn dport(p: Protocol, port: u16) -> [Expr; 4] {
        let [a, b] = l4proto(p);
        [
            a,
            b,
            load_dport(NFT_REG_1),
            Expr::Cmp {
                neq: false,
                data: port.to_be_bytes().to_vec(),
            },
        ]
    }

    /// `dnat to A:P` (after `meta l4proto`).
    pub fn dnat_to(ip: &IpAddr, port: u16) -> [Expr; 3] {
        [
            Expr::Immediate {
                reg: NFT_REG_1,
                data: ip_bytes(ip),
            },
            Expr::Immediate {
                reg: NFT_REG_2,
                data: port.to_be_bytes().to_vec(),
            },
            Expr::Dnat {
                family: family_of(ip),
                proto_reg: NFT_REG_2,
                flags: Some(0x2), // NF_NAT_RANGE_PROTO_SPECIFIED, as nft
            },
        ]
    }

    /// `[meta l4proto P] dnat ip|ip6 to [ip daddr .] th dport . numgen random mod N map
    /// @MAP`: the endpoint (address . port) is the map's value for the packet's own
    /// destination (`with_addr`; else its port alone) and a random bucket. (`tcp dport`
    /// is `th dport` with nft's `meta l4proto tcp` dependency: the same expressions.)
    pub fn dnat_map(
        v6: bool,
        with_addr: bool,
        protocol: Option<Protocol>,
        modulus: u32,
        map: &str,
    ) -> Vec<Expr> {
        let mut out = Vec::with_capacity(9);
        if let Some(p) = protocol {
            out.extend(l4proto(p));
        }
        // The key's slots; the value is always address . port.
        let addr_slots = if v6 { 4 } else { 1 };
        let key_port_slot = if with_addr {
            out.push(load_addr(false, v6, reg(0)));
            addr_slots
        } else {
            0
        };
        out.push(load_dport(reg(key_port_slot)));
        out.push(Expr::NumgenRandom {
            modulus,
            dreg: reg(key_port_slot + 1),
        });
        out.push(Expr::Lookup {
            set: SetRef::Named(map.to_owned()),
            dreg: Some(NFT_REG_1),
            inv: false,
        });
        out.push(Expr::Dnat {
            family: family_code(v6),
            proto_reg: reg(addr_slots),
            flags: None,
        });
        out
    }

    /// `<ipx> daddr . meta l4proto . th dport vmap @MAP` (`with_addr`), or `meta
    /// l4proto . th dport vmap @MAP`.
    pub fn service_vmap(v6: bool, with_addr: bool, map: &str) -> Vec<Expr> {
        let mut out = Vec::with_capacity(4);
        let mut slot = 0;
        if with_addr {
            out.push(load_addr(false, v6, reg(0)));
            slot = if v6 { 4 } else { 1 };
        }
        out.push(Expr::Meta {
            key: MetaKey::L4proto,
            dreg: reg(slot),
        });
        out.push(load_dport(reg(slot + 1)));
        out.push(lookup(map, Some(NFT_REG_VERDICT), false));
        out
    }

    /// A lookup of `NFT_REG_1…` in the named set (`dreg`: a map's data register).
    pub fn lookup(set: &str, dreg: Option<u32>, inv: bool) -> Expr {
        Expr::Lookup {
            set: SetRef::Named(set.to_owned()),
            dreg,
            inv,
        }
    }

    /// `<ipx> saddr|daddr [!=] @SET`.
    pub fn addr_in_set(source: bool, v6: bool, set: &str, inv: bool) -> [Expr; 2] {
        [load_addr(source, v6, NFT_REG_1), lookup(set, None, inv)]
    }

    /// `<ipx> saddr . <ipx> daddr @SET`.
    pub fn saddr_daddr_in_set(v6: bool, set: &str) -> [Expr; 3] {
        let daddr_slot = if v6 { 4 } else { 1 };
        [
            load_addr(true, v6, reg(0)),
            load_addr(false, v6, reg(daddr_slot)),
            lookup(set, None, false),
        ]
    }

    /// `update @SET { <ipx> saddr }`.
    pub fn update_saddr(v6: bool, set: &str) -> [Expr; 2] {
        [
            load_addr(true, v6, NFT_REG_1),
            Expr::DynsetUpdate {
                set: set.to_owned(),
            },
        ]
    }

    /// `ct state new` (`ct status dnat` with `status_dnat`).
    fn ct_bit(key: CtKey, bit: u32) -> [Expr; 3] {
        [
            Expr::Ct { key },
            Expr::Bitwise {
                mask: bit.to_ne_bytes().to_vec(),
                xor: vec![0; 4],
            },
            Expr::Cmp {
                neq: true,
                data: vec![0; 4],
            },
        ]
    }

    /// `ct state new`.
    pub fn ct_state_new() -> [Expr; 3] {
        ct_bit(CtKey::State, 0x8) // NF_CT_STATE_NEW_BIT
    }

    /// `ct status dnat`.
    pub fn ct_status_dnat() -> [Expr; 3] {
        ct_bit(CtKey::Status, 0x20) // IPS_DST_NAT
    }

    /// `fib saddr|daddr type local`.
    pub fn fib_local(source: bool) -> [Expr; 2] {
        [
            Expr::Fib { source },
            Expr::Cmp {
                neq: false,
                data: 2u32.to_ne_bytes().to_vec(), // RTN_LOCAL
            },
        ]
    }

    fn mark_load() -> Expr {
        Expr::Meta {
            key: MetaKey::Mark,
            dreg: NFT_REG_1,
        }
    }

    /// `meta mark & M == 0`.
    pub fn mark_clear(m: u32) -> [Expr; 3] {
        [
            mark_load(),
            Expr::Bitwise {
                mask: m.to_ne_bytes().to_vec(),
                xor: vec![0; 4],
            },
            Expr::Cmp {
                neq: false,
                data: vec![0; 4],
            },
        ]
    }

    /// `meta mark set meta mark or M` (`xor`: `… xor M`).
    pub fn mark_set(m: u32, xor: bool) -> [Expr; 3] {
        let mask = if xor { u32::MAX } else { !m };
        [
            mark_load(),
            Expr::Bitwise {
                mask: mask.to_ne_bytes().to_vec(),
                xor: m.to_ne_bytes().to_vec(),
            },
            Expr::MetaSet { key: MetaKey::Mark },
        ]
    }

    /// `numgen random mod N vmap { 0 : V0, 1 : V1, … }` (an anonymous verdict map).
    pub fn numgen_vmap(verdicts: Vec<Verdict>) -> [Expr; 2] {
        let mut spec = SetSpec::new("", vec![Field::TypeofNumgen]);
        spec.data = Some(SetData::Verdict);
        let elems = verdicts
            .into_iter()
            .enumerate()
            .map(|(i, v)| Elem::verdict(Key::default().bucket(i as u32), v))
            .collect::<Vec<_>>();
        [
            Expr::NumgenRandom {
                modulus: elems.len() as u32,
                dreg: NFT_REG_1,
            },
            Expr::Lookup {
                set: SetRef::Anonymous(Box::new(AnonymousSet { spec, elems })),
                dreg: Some(NFT_REG_VERDICT),
                inv: false,
            },
        ]
    }

    /// `reject` as nft writes it in an `ip`/`ip6` table: ICMP(v6) port unreachable.
    pub fn reject(v6: bool) -> Expr {
        Expr::Reject {
            code: if v6 { 4 } else { 3 },
        }
    }

    pub fn verdict(v: Verdict) -> Expr {
        Expr::ImmediateVerdict(v)
    }
}

/// A NETLINK_NETFILTER socket, possibly in another network namespace.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
    /// The send buffer size set so far (0: the default).
    sndbuf: usize,
}

/// What fits in the default send buffer (`net.core.wmem_default` is 208 KiB).
const DEFAULT_SNDBUF: usize = 128 * 1024;

impl Socket {
    /// A socket in this process's network namespace, or in the named one
    /// (`/run/netns/NAME`, as `ip netns` creates them). A socket stays in the namespace
    /// it was created in, so a short-lived thread enters the namespace to create it.
    pub fn open(netns: Option<&str>) -> Result<Socket, NetlinkError> {
        let fd = netfilter_socket(netns)?;
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() as u32);
        Ok(Socket { fd, seq, sndbuf: 0 })
    }

    pub fn batch(&mut self) -> Batch {
        let b = Batch::new(self.seq);
        // Far apart: a full sync's batch has hundreds of thousands of messages.
        self.seq = self.seq.wrapping_add(1 << 24);
        b
    }

    /// A send buffer for one datagram of `len` bytes: the kernel takes a batch in one
    /// message, as nft does (`SO_SNDBUFFORCE`, which needs CAP_NET_ADMIN like the rest).
    fn ensure_sndbuf(&mut self, len: usize) -> io::Result<()> {
        if len <= DEFAULT_SNDBUF.max(self.sndbuf) {
            return Ok(());
        }
        let want = len.saturating_add(64 * 1024);
        let Ok(value) = libc::c_int::try_from(want) else {
            return Err(io::Error::other(format!("a batch of {len} bytes")));
        };
        for opt in [libc::SO_SNDBUFFORCE, libc::SO_SNDBUF] {
            // SAFETY: `value` is a valid c_int of the given size.
            let rc = unsafe {
                libc::setsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&value as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                self.sndbuf = want;
                return Ok(());
            }
        }
        Err(io::Error::last_os_error())
    }

    /// Send `batch` and read the kernel's answer. The kernel commits a batch as a whole
    /// or not at all, and handles it inside the send: every reply is queued when it
    /// returns. Success is the last message's acknowledgement with no error before it;
    /// the first error is returned.
    pub fn commit(&mut self, batch: Batch) -> Result<(), NetlinkError> {
        let (buf, first_seq, last) = batch.finish();
        let Some(last_seq) = last else {
            return Ok(());
        };
        self.ensure_sndbuf(buf.len())?;
        crate::netlink::send(&self.fd, &buf)?;
        drop(buf);
        let in_batch = |seq: u32| seq.wrapping_sub(first_seq) <= last_seq.wrapping_sub(first_seq);
        let mut confirmed = false;
        let mut first_error = None;
        let mut rx = vec![0u8; 64 * 1024];
        let mut waited = false;
        loop {
            // Never blocks past the socket's receive timeout (see `netfilter_socket`).
            let n = match recv(&self.fd, &mut rx, !waited) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if confirmed || first_error.is_some() {
                        break;
                    }
                    if waited {
                        return Err(NetlinkError::Unconfirmed);
                    }
                    waited = true;
                    continue;
                }
                Err(e) => return Err(NetlinkError::Io(e)),
            };
            let mut msgs = &rx[..n];
            while msgs.len() >= 16 {
                let len = u32::from_ne_bytes([msgs[0], msgs[1], msgs[2], msgs[3]]) as usize;
                let ty = u16::from_ne_bytes([msgs[4], msgs[5]]);
                let seq = u32::from_ne_bytes([msgs[8], msgs[9], msgs[10], msgs[11]]);
                if len < 16 || len > msgs.len() {
                    return Err(NetlinkError::Malformed);
                }
                if ty == NLMSG_ERROR && in_batch(seq) {
                    if len < 20 {
                        return Err(NetlinkError::Malformed);
                    }
                    let code = i32::from_ne_bytes([msgs[16], msgs[17], msgs[18], msgs[19]]);
                    if code != 0 && first_error.is_none() {
                        first_error = Some(io::Error::from_raw_os_error(-code));
                    }
                    if seq == last_seq {
                        confirmed = true;
                    }
                }
                msgs = &msgs[len.next_multiple_of(4).min(msgs.len())..];
            }
            if waited && (confirmed || first_error.is_some()) {
                break;
            }
        }
        match first_error {
            Some(e) => Err(NetlinkError::Refused(e)),
            None => Ok(()),
        }
    }
}

/// A chain, set or map of a table, as [`list_objects`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Chain(String),
    Set(String),
    Map(String),
}

const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETSET: u16 = 10;

/// The chains, named sets and maps of `<family> <table>` (anonymous sets, which go with
/// their rule, are left out): a dump of each kind, names only. Empty when the table
/// does not exist. (What `nft list chains|sets|maps` prints, without nft's process.)
pub fn list_objects(
    netns: Option<&str>,
    family: u8,
    table: &str,
) -> Result<Vec<Object>, NetlinkError> {
    use crate::netlink::{NLM_F_DUMP, attrs, cstr, ne_u32, push_attr};
    let mut sock = crate::netlink::Socket::open(libc::NETLINK_NETFILTER, netns)?;
    let mut body = vec![family, 0, 0, 0]; // nfgenmsg: family, NFNETLINK_V0, res_id 0
    push_attr(&mut body, NFTA_CHAIN_TABLE, &cstr(table)); // = NFTA_SET_TABLE: 1
    let mut out = Vec::new();
    for (msg, name_attr) in [
        (NFT_MSG_GETCHAIN, NFTA_CHAIN_NAME),
        (NFT_MSG_GETSET, NFTA_SET_NAME),
    ] {
        let replies = sock
            .request(
                (NFNL_SUBSYS_NFTABLES << 8) | msg,
                NLM_F_REQUEST | NLM_F_DUMP,
                &body,
            )
            .or_else(|e| match e.errno() {
                // The table (or the family's tables) does not exist.
                Some(libc::ENOENT) => Ok(Vec::new()),
                _ => Err(io::Error::other(e.to_string())),
            })?;
        for reply in &replies {
            let Some(payload) = reply.get(4..) else {
                return Err(NetlinkError::Malformed);
            };
            let (mut ours, mut name, mut flags) = (false, None, 0);
            for (ty, v) in attrs(payload) {
                let text = || std::str::from_utf8(v.strip_suffix(&[0]).unwrap_or(v)).ok();
                match ty {
                    1 => ours = text() == Some(table), // NFTA_CHAIN_TABLE / NFTA_SET_TABLE
                    t if t == name_attr => name = text().map(str::to_owned),
                    NFTA_SET_FLAGS if msg == NFT_MSG_GETSET => {
                        flags = ne_u32(v).map_or(0, u32::from_be);
                    }
                    _ => {}
                }
            }
            let Some(name) = name.filter(|_| ours) else {
                continue;
            };
            out.push(match msg {
                NFT_MSG_GETCHAIN => Object::Chain(name),
                _ if flags & NFT_SET_ANONYMOUS != 0 => continue,
                _ if flags & NFT_SET_MAP != 0 => Object::Map(name),
                _ => Object::Set(name),
            });
        }
    }
    Ok(out)
}

/// Receive one datagram; `dontwait`: `WouldBlock` instead of waiting when none is queued.
fn recv(fd: &OwnedFd, buf: &mut [u8], dontwait: bool) -> io::Result<usize> {
    let flags = if dontwait { libc::MSG_DONTWAIT } else { 0 };
    loop {
        // SAFETY: `buf` is a valid, exclusively borrowed buffer of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], i: usize) -> u16 {
        u16::from_ne_bytes([b[i], b[i + 1]])
    }
    fn u32_at(b: &[u8], i: usize) -> u32 {
        u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
    }
    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn a_batch_is_framed_and_only_its_last_message_acked() {
        let mut b = Batch::new(100);
        b.flush_chain(NFPROTO_IPV4, "svcplane", "service-x");
        let (buf, first_seq, last) = b.finish();
        assert_eq!((first_seq, last), (100, Some(101)));
        // BATCH_BEGIN: header + nfgenmsg with res_id NFNL_SUBSYS_NFTABLES (big-endian).
        assert_eq!(u32_at(&buf, 0), 20);
        assert_eq!(u16_at(&buf, 4), NFNL_MSG_BATCH_BEGIN);
        assert_eq!(&buf[18..20], &10u16.to_be_bytes());
        // The rule delete: its type, ACK flag, seq, family, then TABLE and CHAIN strings.
        let m = &buf[20..];
        let len = u32_at(m, 0) as usize;
        assert_eq!(u16_at(m, 4), (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELRULE);
        assert_ne!(u16_at(m, 6) & NLM_F_ACK, 0);
        assert_eq!(u32_at(m, 8), 101);
        assert_eq!(m[16], NFPROTO_IPV4);
        assert_eq!(u16_at(m, 20), 4 + 9); // "svcplane\0"
        assert_eq!(u16_at(m, 22), NFTA_RULE_TABLE);
        assert_eq!(&m[24..33], b"svcplane\0");
        assert_eq!(u16_at(m, 36), 4 + 10);
        assert_eq!(u16_at(m, 38), NFTA_RULE_CHAIN);
        assert_eq!(&m[40..50], b"service-x\0");
        assert_eq!(len, 52); // padded to 4 bytes
        // BATCH_END last, 4-byte aligned throughout.
        assert_eq!(u16_at(&buf, 20 + len + 4), NFNL_MSG_BATCH_END);
        assert_eq!(buf.len(), 20 + len + 20);

        let mut b = Batch::new(1);
        b.flush_chain(NFPROTO_IPV4, "t", "a");
        b.flush_chain(NFPROTO_IPV4, "t", "b");
        let (buf, _, last) = b.finish();
        assert_eq!(last, Some(3));
        let first = &buf[20..];
        assert_eq!(
            u16_at(first, 6) & NLM_F_ACK,
            0,
            "only the last message is acked"
        );
        assert!(Batch::new(1).finish().2.is_none());
    }

    #[test]
    fn nested_attributes_carry_their_length_and_flag() {
        let mut b = Batch::new(1);
        b.add_rule(
            NFPROTO_IPV4,
            "t",
            "c",
            &[Expr::ImmediateVerdict(Verdict::Jump("m".into()))],
            None,
        );
        let (buf, _, _) = b.finish();
        let m = &buf[20..];
        // After TABLE "t\0" (8) and CHAIN "c\0" (8): EXPRESSIONS, nested.
        let exprs = 20 + 8 + 8;
        assert_eq!(u16_at(m, exprs + 2), NFTA_RULE_EXPRESSIONS | NLA_F_NESTED);
        let len = u16_at(m, exprs) as usize;
        assert_eq!(exprs + len, u32_at(m, 0) as usize);
        assert_eq!(u16_at(m, exprs + 6), NFTA_LIST_ELEM | NLA_F_NESTED);
    }

    #[test]
    fn element_keys_pad_each_field_to_four_bytes() {
        let ip: IpAddr = "10.96.0.5".parse().unwrap();
        let k = Key::default().ip(&ip).proto(Protocol::Udp).port(53);
        assert_eq!(k.0, [10, 96, 0, 5, 17, 0, 0, 0, 0, 53, 0, 0]);
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(Key::default().ip(&v6).ip(&v6).0.len(), 32);
    }

    #[test]
    fn prefixes_match_as_nft_writes_them() {
        // Byte-aligned: load only the prefix bytes, no mask.
        let e = exprs::net_match(true, &"10.244.0.0/16".parse().unwrap(), true).unwrap();
        assert_eq!(e.len(), 2);
        assert!(matches!(
            e[0],
            Expr::Payload {
                offset: 12,
                len: 2,
                ..
            }
        ));
        // Not aligned: load the address, mask, compare.
        let e = exprs::net_match(true, &"10.128.0.0/9".parse().unwrap(), true).unwrap();
        assert_eq!(
            e[1],
            Expr::Bitwise {
                mask: vec![255, 128, 0, 0],
                xor: vec![0; 4],
            }
        );
        assert!(exprs::net_match(true, &"0.0.0.0/0".parse().unwrap(), true).is_none());
    }

    #[test]
    fn registers_follow_nfts_layout() {
        // ip: 32-bit slots 0, 1, 2 → NFT_REG_1, NFT_REG32_01, NFT_REG32_02;
        // ip6: an address fills slots 0-3, the next field is NFT_REG_2, then REG32_05.
        assert_eq!([reg(0), reg(1), reg(2), reg(4), reg(5)], [1, 9, 10, 2, 13]);
    }

    #[test]
    fn set_userdata_is_what_nft_sends() {
        // Captured from `nft --debug=mnl -f` (nft 1.0.6) for the same declarations.
        let v4 = Field::Addr { v6: false };
        let mut s = SetSpec::new("cluster-ips", vec![v4]);
        s.comment = Some("Active ClusterIPs".into());
        assert_eq!(
            hex(&set_udata(&s, false)),
            "000402000000071241637469766520436c757374657249507300"
        );
        let mut s = SetSpec::new("hairpin", vec![Field::Addr { v6: true }; 2]);
        s.comment = Some("h".into());
        assert_eq!(
            hex(&set_udata(&s, false)),
            "000400000000030800040d000000010007026800"
        );
        let mut s = SetSpec::new("service-ips", vec![v4, Field::Proto, Field::Service]);
        s.data = Some(SetData::Verdict);
        s.comment = Some("ClusterIP".into());
        assert_eq!(
            hex(&set_udata(&s, false)),
            "000400000000010400000000030800040d0000000100060400000000070a436c7573746572495000"
        );
        assert_eq!(fields_type(&s.key), (0x730d, 12, 0));
        let mut s = SetSpec::new(
            "endpoints-udp",
            vec![
                Field::TypeofAddr {
                    v6: true,
                    source: false,
                },
                Field::TypeofDport(Some(Protocol::Udp)),
                Field::TypeofNumgen,
            ],
        );
        s.data = Some(SetData::Fields(vec![
            Field::TypeofAddr {
                v6: true,
                source: false,
            },
            Field::TypeofDport(Some(Protocol::Udp)),
        ]));
        assert_eq!(
            hex(&set_udata(&s, false)),
            "000400000000010400000000035000040d00000001480014000407000000010c00040d0000000104090000000114000407000000010c000406000000010402000000021a0004170000000112000401000000010401000000020400000000043400040d000000012c0014000407000000010c00040d0000000104090000000114000407000000010c000406000000010402000000060400000000"
        );
        assert_eq!(fields_type(&s.key), (0x8344, 24, 0));
        let mut s = SetSpec::new(
            "aff2",
            vec![Field::TypeofAddr {
                v6: false,
                source: true,
            }],
        );
        s.timeout_secs = Some(10800);
        assert_eq!(
            hex(&set_udata(&s, false)),
            "0004020000000314000407000000010c00040c00000001040b000000"
        );
        // Anonymous: `ip6 saddr != { … }` and `numgen random mod 2 vmap { … }`.
        let mut s = SetSpec::new(
            "",
            vec![Field::TypeofAddr {
                v6: true,
                source: true,
            }],
        );
        s.interval = true;
        assert_eq!(
            hex(&set_udata(&s, true)),
            "0004020000000204010000000314000407000000010c00040d000000010408000000"
        );
        let mut s = SetSpec::new("", vec![Field::TypeofNumgen]);
        s.data = Some(SetData::Verdict);
        assert_eq!(
            hex(&set_udata(&s, true)),
            "00040100000001040000000004080004010000000100060400000000"
        );
    }

    #[test]
    fn intervals_close_each_range_once() {
        let nets: Vec<IpNet> = ["10.0.0.0/24", "10.0.1.0/24", "192.168.1.1/32"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        let e = intervals(&nets, true);
        let flat: Vec<(String, bool)> = e.iter().map(|e| (hex(&e.key.0), e.interval_end)).collect();
        assert_eq!(
            flat,
            [
                ("00000000", true),
                ("0a000000", false),
                ("0a000100", true),
                ("0a000100", false),
                ("0a000200", true),
                ("c0a80101", false),
                ("c0a80102", true),
            ]
            .map(|(k, f)| (k.to_owned(), f))
        );
        // The last range of the address space has no end element: it is open.
        let e = intervals(&["128.0.0.0/1".parse().unwrap()], false);
        assert_eq!(e.len(), 1);
        assert!(e[0].interval_open && !e[0].interval_end);
    }
}
