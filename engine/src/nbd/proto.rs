//! The NBD wire format (NetworkBlockDevice/nbd `doc/proto.md`): constants and pure
//! parsers and encoders, bytes in and typed values out, no I/O.

use bytes::{BufMut, BytesMut};

/// "NBDMAGIC", the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation magic, also prefixing every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic prefixing every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of a transmission request once extended headers are negotiated.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of every reply chunk once extended headers are negotiated.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: no 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flags the server understands.
pub const CLIENT_FLAGS_KNOWN: u32 = 3;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Ends negotiation without transmission.
pub const OPT_ABORT: u32 = 2;
/// Lists exports.
pub const OPT_LIST: u32 = 3;
/// Starts TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Asks about an export.
pub const OPT_INFO: u32 = 6;
/// Asks about an export and enters transmission.
pub const OPT_GO: u32 = 7;
/// Enables structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Lists metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Selects metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Enables extended headers: 64-bit lengths, one reply format for everything.
pub const OPT_EXTENDED_HEADERS: u32 = 11;
/// Reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// The allocation context every server may offer.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// Our id for base:allocation.
pub const META_ID_ALLOCATION: u32 = 1;
/// Block status flag: unallocated.
pub const STATE_HOLE: u32 = 1;
/// Block status flag: reads as zeroes.
pub const STATE_ZERO: u32 = 2;

/// Option reply types.
pub const REP_ACK: u32 = 1;
/// One export in a list.
pub const REP_SERVER: u32 = 2;
/// One piece of export information.
pub const REP_INFO: u32 = 3;
/// The option is not supported.
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
/// The option is forbidden by policy.
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
/// The option was malformed.
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
/// The export is not known.
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
/// Option reply: the server requires TLS first.
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
/// The option data is too big.
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
/// Extended headers were negotiated and take precedence over this option.
pub const REP_ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;

/// Information types for NBD_OPT_INFO / NBD_OPT_GO.
pub const INFO_EXPORT: u16 = 0;
/// Export name.
pub const INFO_NAME: u16 = 1;
/// Human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1;
/// The export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// NBD_CMD_FLUSH is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// NBD_CMD_FLAG_FUA is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// NBD_CMD_TRIM is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// NBD_CMD_WRITE_ZEROES is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// NBD_CMD_FLAG_DF is supported on reads (only with structured replies).
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// A flush on one connection covers writes completed on all of them.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// NBD_CMD_CACHE is supported.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// NBD_CMD_FLAG_FAST_ZERO is supported on write-zeroes.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim.
pub const CMD_TRIM: u16 = 4;
/// Prefetch a range (advisory).
pub const CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1;
/// Write zeroes must allocate.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Read must not be fragmented.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Block status: one extent is enough.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Write zeroes: fail with ENOTSUP rather than be slower than a write.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers: the length is that of a payload following the header.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1;
/// No payload; ends the reply.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// An error, with a message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// Block status descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Block status descriptors with 64-bit lengths (extended headers only).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;

/// Errors sent to the client (Linux errno values, as the spec fixes them).
pub const EPERM: u32 = 1;
/// I/O error.
pub const EIO: u32 = 5;
/// Out of memory.
pub const ENOMEM: u32 = 12;
/// Invalid argument.
pub const EINVAL: u32 = 22;
/// No space left.
pub const ENOSPC: u32 = 28;
/// Value too large.
pub const EOVERFLOW: u32 = 75;
/// Operation not supported.
pub const ENOTSUP: u32 = 95;
/// Server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Length of an extended transmission request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Most bytes of zeroes one NO_HOLE request may write as data (as compact headers
/// allowed).
pub const NO_HOLE_MAX: u64 = u32::MAX as u64;
/// Most a block status request covers at once: a reply may cover less than asked,
/// and descriptors of compact replies hold 32-bit lengths.
pub const BLOCK_STATUS_MAX: u64 = 0xffff_f000;
/// Largest request payload accepted: the maximum block size advertised.
pub use tether_proto::wire::MAX_IO_BYTES as MAX_PAYLOAD;
/// Largest option payload accepted before the connection is dropped.
pub const MAX_OPTION_LEN: u32 = 64 << 10;

/// A malformed message that ends the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// Bad magic: the stream is out of sync and cannot be trusted any more.
    #[error("bad request magic {0:#x}")]
    BadMagic(u32),
}

/// A parsed transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Opaque cookie echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length: 32 bits in compact headers, 64 in extended ones.
    pub length: u64,
}

/// The fields both framings share, at the same offsets; `length` reads the rest.
fn parse_fields(
    b: &[u8],
    want: u32,
    length: impl Fn(&[u8]) -> u64,
) -> Result<RequestHeader, CodecError> {
    let be = |i: usize, n: usize| b[i..i + n].iter().fold(0u64, |a, &x| a << 8 | u64::from(x));
    let magic = be(0, 4) as u32;
    if magic != want {
        return Err(CodecError::BadMagic(magic));
    }
    Ok(RequestHeader {
        flags: be(4, 2) as u16,
        kind: be(6, 2) as u16,
        handle: be(8, 8),
        offset: be(16, 8),
        length: length(b),
    })
}

/// Parses a request header.
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<RequestHeader, CodecError> {
    parse_fields(b, REQUEST_MAGIC, |b| {
        u64::from(u32::from_be_bytes([b[24], b[25], b[26], b[27]]))
    })
}

/// Parses an extended request header (after NBD_OPT_EXTENDED_HEADERS).
pub fn parse_extended_request(b: &[u8; EXTENDED_REQUEST_LEN]) -> Result<RequestHeader, CodecError> {
    parse_fields(b, EXTENDED_REQUEST_MAGIC, |b| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[24..32]);
        u64::from_be_bytes(a)
    })
}

impl RequestHeader {
    /// Bytes of payload that follow the header on the wire, which the server must
    /// consume even when it refuses the request: a write's data; in extended headers
    /// also whatever `NBD_CMD_FLAG_PAYLOAD_LEN` announces. (The extension's draft has
    /// writes carry that flag; qemu 10 sends them without it, as its own server
    /// reads them: a write's length is its payload's either way.)
    pub fn payload_len(&self, extended: bool) -> u64 {
        if self.kind == CMD_WRITE || (extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0) {
            self.length
        } else {
            0
        }
    }

    /// Whether the answer comes in structured chunks when those were negotiated
    /// (reads and block status), refused or not.
    pub fn answered_in_chunks(&self) -> bool {
        matches!(self.kind, CMD_READ | CMD_BLOCK_STATUS)
    }
}

/// A transmission request, parsed once and checked against the export and what the
/// client negotiated: the serving loop matches this, never raw command numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `length` bytes at `offset` (always answered in one chunk, so a DF read
    /// needs nothing more).
    Read { offset: u64, length: u32 },
    /// Write the payload at `offset`; with `fua`, durably.
    Write { offset: u64, length: u32, fua: bool },
    /// Make every completed write durable.
    Flush,
    /// Discard a range (advisory); with `fua`, durably.
    Trim { offset: u64, length: u64, fua: bool },
    /// Write zeroes; `may_trim` unless the client asked for no holes. A fast zero
    /// (which may not be slower than a write) always may trim: one that may not is
    /// refused before this.
    WriteZeroes {
        offset: u64,
        length: u64,
        may_trim: bool,
        fua: bool,
    },
    /// Report allocation of up to `length` bytes; with `req_one`, only the first
    /// extent.
    BlockStatus {
        offset: u64,
        length: u32,
        req_one: bool,
    },
    /// Prefetch a range (advisory).
    Cache { offset: u64, length: u64 },
    /// The client is done.
    Disconnect,
}

/// What a request is checked against: the export and the negotiated options.
#[derive(Debug, Clone, Copy)]
pub struct Checks {
    /// The export's size in bytes.
    pub size: u64,
    /// The export refuses changes.
    pub read_only: bool,
    /// `base:allocation` was selected, so block status may be asked.
    pub allocation: bool,
    /// Structured replies (or extended headers) were negotiated: DF reads may be asked.
    pub structured: bool,
    /// Extended headers were negotiated: writes may carry `NBD_CMD_FLAG_PAYLOAD_LEN`.
    pub extended: bool,
}

/// The transmission flags an export advertises to a client that negotiated `mode`:
/// only what is implemented, and DF only where a read can be answered in chunks.
pub fn transmission_flags(read_only: bool, structured: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN | TFLAG_SEND_CACHE;
    if read_only {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= TFLAG_SEND_DF;
    }
    f
}

/// Why a request is refused; each kind is answered with the errno the spec asks for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// EINVAL.
    #[error("{0}")]
    Invalid(String),
    /// ENOSPC: a write past the end.
    #[error("{0}")]
    NoSpace(String),
    /// EPERM: a change to a read-only export.
    #[error("{0}")]
    ReadOnly(String),
    /// ENOTSUP: a fast zero that could not be fast.
    #[error("{0}")]
    NotFast(String),
    /// EOVERFLOW: more work than one request may ask for.
    #[error("{0}")]
    TooLarge(String),
}

/// The command flags a request of `kind` may carry after negotiating `n` (FUA on
/// every command: the spec asks servers that advertise it to accept it anywhere).
pub fn known_flags(kind: u16, n: &Checks) -> u16 {
    let only_if = |cond: bool, f: u16| if cond { f } else { 0 };
    CMD_FLAG_FUA
        | match kind {
            CMD_READ => only_if(n.structured, CMD_FLAG_DF),
            CMD_WRITE => only_if(n.extended, CMD_FLAG_PAYLOAD_LEN),
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        }
}

/// Turns a request header into a [`Command`], refusing unknown commands, flags that
/// are not valid for the command or were not negotiated, changes to a read-only
/// export, block status without its context, oversized reads, ranges past the end,
/// and fast zeroes that could not be fast.
pub fn command(req: &RequestHeader, n: &Checks) -> Result<Command, Refusal> {
    match req.kind {
        CMD_DISC => return Ok(Command::Disconnect),
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES
        | CMD_BLOCK_STATUS => {}
        other => {
            return Err(Refusal::Invalid(format!(
                "command {other} is not supported"
            )))
        }
    }
    let known = known_flags(req.kind, n);
    if req.flags & !known != 0 {
        return Err(Refusal::Invalid(format!(
            "flags {:#x} are not valid for command {} on this connection",
            req.flags & !known,
            req.kind
        )));
    }
    let (offset, length) = (req.offset, req.length);
    // Reads and writes carry their data in one message: no more than the maximum.
    let short = |what: &str| {
        u32::try_from(length)
            .ok()
            .filter(|&l| l <= MAX_PAYLOAD)
            .ok_or_else(|| {
                Refusal::Invalid(format!(
                    "{what} of {length} bytes exceeds the maximum {MAX_PAYLOAD}"
                ))
            })
    };
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let cmd = match req.kind {
        CMD_READ => Command::Read {
            offset,
            length: short("read")?,
        },
        CMD_WRITE => Command::Write {
            offset,
            length: short("write")?,
            fua,
        },
        CMD_FLUSH => Command::Flush,
        CMD_TRIM => Command::Trim {
            offset,
            length,
            fua,
        },
        CMD_CACHE => Command::Cache { offset, length },
        CMD_WRITE_ZEROES => {
            let may_trim = req.flags & CMD_FLAG_NO_HOLE == 0;
            if req.flags & CMD_FLAG_FAST_ZERO != 0 && !may_trim && !n.read_only {
                // Zeroes that must stay allocated are written as data: no faster
                // than the write the client would do instead.
                return Err(Refusal::NotFast(
                    "zeroes that must stay allocated (NO_HOLE) are written as data; not fast"
                        .into(),
                ));
            }
            if !may_trim && length > NO_HOLE_MAX {
                // Written as data, 1 MiB at a time: a 64-bit length would tie the
                // connection up for hours. The spec allows refusing it so.
                return Err(Refusal::TooLarge(format!(
                    "zeroes that must stay allocated are written as data: at most {NO_HOLE_MAX} bytes per request, not {length}"
                )));
            }
            Command::WriteZeroes {
                offset,
                length,
                may_trim,
                fua,
            }
        }
        _ => Command::BlockStatus {
            offset,
            length: length.min(BLOCK_STATUS_MAX) as u32,
            req_one: req.flags & CMD_FLAG_REQ_ONE != 0,
        },
    };
    let changes = matches!(
        cmd,
        Command::Write { .. } | Command::WriteZeroes { .. } | Command::Trim { .. }
    );
    if n.read_only && changes {
        return Err(Refusal::ReadOnly("this export is read-only".into()));
    }
    match cmd {
        Command::Flush => return Ok(cmd),
        Command::BlockStatus { .. } if length == 0 => {
            return Err(Refusal::Invalid("block status of 0 bytes".into()))
        }
        _ => {}
    }
    let end = offset.checked_add(length);
    if end.is_none_or(|end| end > n.size) {
        let msg = format!(
            "range {offset}+{length} is past the end of the export ({} bytes)",
            n.size
        );
        // The spec asks for ENOSPC on writes past the end, EINVAL otherwise.
        return Err(match cmd {
            Command::Write { .. } | Command::WriteZeroes { .. } => Refusal::NoSpace(msg),
            _ => Refusal::Invalid(msg),
        });
    }
    if matches!(cmd, Command::BlockStatus { .. }) && !n.allocation {
        return Err(Refusal::Invalid(
            "block status needs the base:allocation context".into(),
        ));
    }
    Ok(cmd)
}

/// Writes the fields both framings share into the start of `b`.
fn encode_fields(b: &mut [u8], magic: u32, h: &RequestHeader) {
    b[0..4].copy_from_slice(&magic.to_be_bytes());
    b[4..6].copy_from_slice(&h.flags.to_be_bytes());
    b[6..8].copy_from_slice(&h.kind.to_be_bytes());
    b[8..16].copy_from_slice(&h.handle.to_be_bytes());
    b[16..24].copy_from_slice(&h.offset.to_be_bytes());
}

/// Encodes a compact request header (used by tests and tools); the length is cut
/// to its 32 bits.
pub fn encode_request(h: &RequestHeader) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    encode_fields(&mut b, REQUEST_MAGIC, h);
    b[24..28].copy_from_slice(&(h.length as u32).to_be_bytes());
    b
}

/// Encodes an extended request header (used by tests and tools).
pub fn encode_extended_request(h: &RequestHeader) -> [u8; EXTENDED_REQUEST_LEN] {
    let mut b = [0u8; EXTENDED_REQUEST_LEN];
    encode_fields(&mut b, EXTENDED_REQUEST_MAGIC, h);
    b[24..32].copy_from_slice(&h.length.to_be_bytes());
    b
}

/// The body of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name (may be empty: the default export).
    pub name: String,
    /// Information types asked for.
    pub requests: Vec<u16>,
}

/// Parses the body of NBD_OPT_INFO / NBD_OPT_GO; `None` if malformed.
pub fn parse_info_request(data: &[u8]) -> Option<InfoRequest> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = &data[4 + name_len..];
    let n = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let list = &rest[2..];
    if list.len() != n * 2 {
        return None;
    }
    let requests = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some(InfoRequest {
        name: String::from_utf8(name.to_vec()).ok()?,
        requests,
    })
}

/// The body of NBD_OPT_{LIST,SET}_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// Export name.
    pub name: String,
    /// Context queries.
    pub queries: Vec<String>,
}

/// Parses a meta context request; `None` if malformed.
pub fn parse_meta_request(data: &[u8]) -> Option<MetaRequest> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let mut rest = &data[4 + name_len..];
    let n = u32::from_be_bytes(rest.get(0..4)?.try_into().ok()?) as usize;
    rest = &rest[4..];
    let mut queries = Vec::new();
    for _ in 0..n {
        let len = u32::from_be_bytes(rest.get(0..4)?.try_into().ok()?) as usize;
        let q = rest.get(4..4usize.checked_add(len)?)?;
        queries.push(String::from_utf8(q.to_vec()).ok()?);
        rest = &rest[4 + len..];
    }
    if !rest.is_empty() {
        return None;
    }
    Some(MetaRequest {
        name: String::from_utf8(name.to_vec()).ok()?,
        queries,
    })
}

/// Appends an option reply with `data`.
pub fn put_option_reply(out: &mut BytesMut, option: u32, kind: u32, data: &[u8]) {
    out.put_u64(REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(kind);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// Appends a simple reply header (data, if any, follows separately).
pub fn put_simple_reply(out: &mut BytesMut, error: u32, handle: u64) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(handle);
}

/// Appends a structured reply chunk header for `length` bytes of payload.
pub fn put_structured_header(out: &mut BytesMut, flags: u16, kind: u16, handle: u64, length: u32) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(kind);
    out.put_u64(handle);
    out.put_u32(length);
}

/// Appends an extended reply chunk header for `length` bytes of payload; `offset`
/// is the request's.
pub fn put_extended_header(
    out: &mut BytesMut,
    flags: u16,
    kind: u16,
    handle: u64,
    offset: u64,
    length: u64,
) {
    out.put_u32(EXTENDED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(kind);
    out.put_u64(handle);
    out.put_u64(offset);
    out.put_u64(length);
}

/// Appends a complete extended error chunk.
pub fn put_extended_error(out: &mut BytesMut, handle: u64, offset: u64, error: u32, msg: &str) {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    put_extended_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        offset,
        6 + msg.len() as u64,
    );
    out.put_u32(error);
    out.put_u16(msg.len() as u16);
    out.put_slice(msg);
}

/// Appends a complete structured error chunk.
pub fn put_structured_error(out: &mut BytesMut, handle: u64, error: u32, msg: &str) {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    put_structured_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        6 + msg.len() as u32,
    );
    out.put_u32(error);
    out.put_u16(msg.len() as u16);
    out.put_slice(msg);
}

#[cfg(test)]
mod tests {
    fn req(kind: u16, flags: u16, offset: u64, length: u64) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            handle: 7,
            offset,
            length,
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]
        /// Whatever a client sends, `command` answers (no panic) and lets through
        /// only what the export allows: in range, flags known for the command, no
        /// change to a read-only export, no block status without its context.
        #[test]
        fn any_request_is_refused_or_safe(
            kind in 0u16..10,
            // Mostly the low bits every command's flags live in, so requests get past
            // the flag check often enough to test the rest.
            flags in proptest::prop_oneof![3 => 0u16..16, 1 => proptest::prelude::any::<u16>()],
            offset in proptest::prop_oneof![3 => 0u64..(1 << 20), 1 => proptest::prelude::any::<u64>()],
            length in proptest::prop_oneof![
                3 => 0u64..(1 << 14),
                1 => proptest::prelude::any::<u32>().prop_map(u64::from),
                1 => proptest::prelude::any::<u64>(),
            ],
            // The export ends near the request's end, on either side of it.
            slack in -8192i64..8192,
            read_only in proptest::prelude::any::<bool>(),
            allocation in proptest::prelude::any::<bool>(),
            structured in proptest::prelude::any::<bool>(),
            extended in proptest::prelude::any::<bool>(),
        ) {
            let size = offset
                .saturating_add(length)
                .saturating_add_signed(slack);
            let checks = Checks { size, read_only, allocation, structured, extended };
            let r = req(kind, flags, offset, length);
            // The spec's table, written out again rather than taken from the code.
            let known = CMD_FLAG_FUA | match kind {
                CMD_READ if structured => CMD_FLAG_DF,
                CMD_WRITE if extended => CMD_FLAG_PAYLOAD_LEN,
                CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
                _ => 0,
            };
            let Ok(cmd) = command(&r, &checks) else {
                return Ok(());
            };
            if cmd == Command::Disconnect {
                proptest::prop_assert_eq!(kind, CMD_DISC);
                return Ok(());
            }
            proptest::prop_assert_eq!(flags & !known, 0, "unknown flags let through");
            let changes = matches!(
                cmd,
                Command::Write { .. } | Command::WriteZeroes { .. } | Command::Trim { .. }
            );
            proptest::prop_assert!(!(read_only && changes), "a change to a read-only export");
            proptest::prop_assert!(
                allocation || !matches!(cmd, Command::BlockStatus { .. }),
                "block status without its context"
            );
            if cmd != Command::Flush {
                proptest::prop_assert!(
                    offset.checked_add(length).is_some_and(|e| e <= size),
                    "a range past the end"
                );
            }
            match cmd {
                Command::Read { length: l, .. } | Command::Write { length: l, .. } => {
                    proptest::prop_assert!(l <= MAX_PAYLOAD && u64::from(l) == length);
                }
                Command::WriteZeroes { may_trim, .. } => proptest::prop_assert!(
                    may_trim || flags & CMD_FLAG_FAST_ZERO == 0,
                    "a fast zero that must write data"
                ),
                Command::BlockStatus { length: l, .. } => proptest::prop_assert!(
                    u64::from(l) == length.min(BLOCK_STATUS_MAX) && l > 0
                ),
                _ => {}
            }

        }
    }

    #[test]
    fn commands_are_checked_once_against_the_export() {
        let rw = Checks {
            size: 1 << 20,
            read_only: false,
            allocation: false,
            structured: false,
            extended: false,
        };
        let ro = Checks {
            read_only: true,
            allocation: true,
            ..rw
        };
        assert_eq!(
            command(&req(CMD_WRITE, CMD_FLAG_FUA, 4096, 512), &rw),
            Ok(Command::Write {
                offset: 4096,
                length: 512,
                fua: true
            })
        );
        assert_eq!(
            command(&req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 8), &rw),
            Ok(Command::WriteZeroes {
                offset: 0,
                length: 8,
                may_trim: false,
                fua: false
            })
        );
        assert_eq!(
            command(&req(CMD_DISC, 0xffff, 0, 0), &rw),
            Ok(Command::Disconnect)
        );
        let refused = |r: Result<Command, Refusal>| r.err().map(|e| std::mem::discriminant(&e));
        let invalid = Some(std::mem::discriminant(&Refusal::Invalid(String::new())));
        // A flag not valid for the command, or not negotiated (DF without structured
        // replies), or a command nobody knows; FUA is accepted everywhere.
        assert_eq!(
            refused(command(&req(CMD_READ, CMD_FLAG_NO_HOLE, 0, 8), &rw)),
            invalid
        );
        assert_eq!(
            refused(command(&req(CMD_READ, CMD_FLAG_DF, 0, 8), &rw)),
            invalid
        );
        assert_eq!(
            command(&req(CMD_READ, CMD_FLAG_FUA, 0, 8), &rw),
            Ok(Command::Read {
                offset: 0,
                length: 8
            })
        );
        let st = Checks {
            structured: true,
            ..rw
        };
        assert!(command(&req(CMD_READ, CMD_FLAG_DF, 0, 8), &st).is_ok());
        assert_eq!(
            refused(command(&req(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 8), &st)),
            invalid
        );
        // Extended headers: writes may say their payload's length; lengths are 64-bit.
        let ext = Checks {
            extended: true,
            structured: true,
            size: 1 << 40,
            ..rw
        };
        assert!(command(&req(CMD_WRITE, 0, 0, 8), &ext).is_ok());
        assert!(command(&req(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 8), &ext).is_ok());
        assert_eq!(
            refused(command(&req(CMD_FLUSH, CMD_FLAG_PAYLOAD_LEN, 0, 8), &ext)),
            invalid
        );
        let payload = |kind, flags, extended| {
            RequestHeader {
                flags,
                kind,
                handle: 1,
                offset: 0,
                length: 512,
            }
            .payload_len(extended)
        };
        assert_eq!(payload(CMD_WRITE, 0, false), 512);
        assert_eq!(payload(CMD_WRITE, 0, true), 512);
        assert_eq!(payload(CMD_FLUSH, CMD_FLAG_PAYLOAD_LEN, true), 512);
        assert_eq!(payload(CMD_FLUSH, CMD_FLAG_PAYLOAD_LEN, false), 0);
        assert_eq!(payload(CMD_BLOCK_STATUS, 0, true), 0);
        assert_eq!(
            command(&req(CMD_TRIM, 0, 0, 1 << 36), &ext),
            Ok(Command::Trim {
                offset: 0,
                length: 1 << 36,
                fua: false
            })
        );
        assert_eq!(
            command(
                &req(CMD_BLOCK_STATUS, 0, 0, 1 << 36),
                &Checks {
                    allocation: true,
                    ..ext
                }
            ),
            Ok(Command::BlockStatus {
                offset: 0,
                length: BLOCK_STATUS_MAX as u32,
                req_one: false
            })
        );
        // A fast zero is refused when it would have to write data, and not otherwise.
        assert!(matches!(
            command(
                &req(
                    CMD_WRITE_ZEROES,
                    CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE,
                    0,
                    8
                ),
                &rw
            ),
            Err(Refusal::NotFast(_))
        ));
        assert!(command(&req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 8), &rw).is_ok());
        // Zeroes written as data are bounded per request; holes are not.
        assert!(matches!(
            command(&req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1 << 33), &ext),
            Err(Refusal::TooLarge(_))
        ));
        assert!(command(&req(CMD_WRITE_ZEROES, 0, 0, 1 << 33), &ext).is_ok());
        assert_eq!(
            command(&req(CMD_CACHE, 0, 4096, 8192), &rw),
            Ok(Command::Cache {
                offset: 4096,
                length: 8192
            })
        );
        assert_eq!(refused(command(&req(99, 0, 0, 8), &rw)), invalid);
        // Past the end: ENOSPC for writes, EINVAL for reads.
        assert!(matches!(
            command(&req(CMD_WRITE, 0, (1 << 20) - 8, 16), &rw),
            Err(Refusal::NoSpace(_))
        ));
        assert_eq!(
            refused(command(&req(CMD_READ, 0, u64::MAX, 16), &rw)),
            invalid
        );
        assert_eq!(
            refused(command(
                &req(CMD_READ, 0, 0, u64::from(MAX_PAYLOAD) + 1),
                &rw
            )),
            invalid
        );
        // Read-only exports refuse changes; block status needs its context.
        assert!(matches!(
            command(&req(CMD_TRIM, 0, 0, 8), &ro),
            Err(Refusal::ReadOnly(_))
        ));
        assert_eq!(
            refused(command(&req(CMD_BLOCK_STATUS, 0, 0, 8), &rw)),
            invalid
        );
        assert_eq!(
            command(&req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 8), &ro),
            Ok(Command::BlockStatus {
                offset: 0,
                length: 8,
                req_one: true
            })
        );
        assert_eq!(
            command(&req(CMD_FLUSH, 0, u64::MAX, 9), &ro),
            Ok(Command::Flush)
        );
    }

    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn request_roundtrip(flags: u16, kind: u16, handle: u64, offset: u64, length: u32) {
            let h = RequestHeader { flags, kind, handle, offset, length: u64::from(length) };
            prop_assert_eq!(parse_request(&encode_request(&h)), Ok(h));
        }

        #[test]
        fn extended_request_roundtrip(flags: u16, kind: u16, handle: u64, offset: u64, length: u64) {
            let h = RequestHeader { flags, kind, handle, offset, length };
            prop_assert_eq!(parse_extended_request(&encode_extended_request(&h)), Ok(h));
            // Each framing refuses the other's magic.
            let mut compact = [0u8; REQUEST_LEN];
            compact.copy_from_slice(&encode_extended_request(&h)[..REQUEST_LEN]);
            prop_assert!(parse_request(&compact).is_err());
        }

        #[test]
        fn request_parse_never_panics(b in proptest::array::uniform28(any::<u8>())) {
            let _ = parse_request(&b);
        }

        #[test]
        fn extended_request_parse_never_panics(b in proptest::array::uniform32(any::<u8>())) {
            let _ = parse_extended_request(&b);
        }

        #[test]
        fn meta_parse_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_meta_request(&b);
        }

        #[test]
        fn info_parse_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_info_request(&b);
        }

        #[test]
        fn info_roundtrip(name in "[a-z0-9]{0,20}", reqs in proptest::collection::vec(any::<u16>(), 0..5)) {
            let mut b = Vec::new();
            b.extend_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
            b.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
            for r in &reqs { b.extend_from_slice(&r.to_be_bytes()); }
            prop_assert_eq!(parse_info_request(&b), Some(InfoRequest { name, requests: reqs }));
        }
    }

    #[test]
    fn bad_magic_is_an_error() {
        let mut b = encode_request(&RequestHeader {
            flags: 0,
            kind: CMD_READ,
            handle: 1,
            offset: 0,
            length: 1,
        });
        b[0] ^= 1;
        assert!(matches!(parse_request(&b), Err(CodecError::BadMagic(_))));
    }

    #[test]
    fn info_with_name_length_past_end_is_malformed() {
        let mut b = Vec::new();
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        b.extend_from_slice(&[0, 0]);
        assert_eq!(parse_info_request(&b), None);
    }
}
