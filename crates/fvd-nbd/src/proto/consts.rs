//! Magic numbers, flags, option codes, command codes and error values of
//! the NBD protocol, as defined by the NBD project's `doc/proto.md`
//! (including the `EXTENDED_HEADERS` extension).
//!
//! Names follow the specification with the leading `NBD_` removed. All
//! values are sent in network byte order (big-endian).

// ---------------------------------------------------------------------------
// Magic numbers
// ---------------------------------------------------------------------------

/// `NBDMAGIC` (ASCII `NBDMAGIC`), first 64 bits sent by the server.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT` (ASCII `IHAVEOPT`): newstyle greeting magic and option
/// request magic.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// `cliserv_magic` of the (unsupported) oldstyle negotiation.
pub const CLISERV_MAGIC: u64 = 0x00_4202_8186_1253;
/// Magic number that starts every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`: compact (28-byte) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_EXTENDED_REQUEST_MAGIC`: extended (32-byte) transmission request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// `NBD_SIMPLE_REPLY_MAGIC`: simple (16-byte) reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`: structured reply chunk (20-byte header).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// `NBD_EXTENDED_REPLY_MAGIC`: extended reply chunk (32-byte header).
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// IANA-reserved TCP port for newstyle NBD.
pub const DEFAULT_PORT: u16 = 10809;

// ---------------------------------------------------------------------------
// Fixed sizes of protocol messages
// ---------------------------------------------------------------------------

/// Size of the server greeting: `NBDMAGIC`, `IHAVEOPT`, 16-bit flags.
pub const GREETING_LEN: usize = 18;
/// Size of the client flags field.
pub const CLIENT_FLAGS_LEN: usize = 4;
/// Size of an option request header: `IHAVEOPT`, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of an option reply header: magic, option, reply type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Number of reserved zero bytes after the `NBD_OPT_EXPORT_NAME` reply
/// unless `NO_ZEROES` was negotiated.
pub const EXPORT_NAME_REPLY_ZEROES: usize = 124;
/// Size of a compact request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_HEADER_LEN: usize = 32;
/// Size of a simple reply.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;
/// Size of an extended reply chunk header.
pub const EXTENDED_REPLY_HEADER_LEN: usize = 32;

// ---------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------

/// Maximum length in bytes of any protocol string (export names, error
/// messages, metadata context names, ...). The spec says strings MUST be
/// no longer than 4096 bytes.
pub const MAX_STRING_LEN: usize = 4096;
/// Portable maximum payload of `NBD_CMD_READ` / `NBD_CMD_WRITE` (2^25).
pub const DEFAULT_MAX_PAYLOAD: u32 = 1 << 25;
/// Default minimum block size a server should support.
pub const DEFAULT_MIN_BLOCK_SIZE: u32 = 1;
/// Default preferred block size.
pub const DEFAULT_PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Maximum block size meaning "no inherent limit".
pub const UNLIMITED_MAX_BLOCK_SIZE: u32 = 0xffff_ffff;

// ---------------------------------------------------------------------------
// Handshake flags (16 bits, server -> client)
// ---------------------------------------------------------------------------

/// Handshake flag bit 0: server supports fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 0x0001;
/// Handshake flag bit 1: server can omit the 124 zero bytes after
/// `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 0x0002;
/// All handshake flags defined by the spec.
pub const HANDSHAKE_FLAGS_KNOWN: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

// ---------------------------------------------------------------------------
// Client flags (32 bits, client -> server)
// ---------------------------------------------------------------------------

/// Client flag bit 0: client supports fixed newstyle negotiation.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 0x0000_0001;
/// Client flag bit 1: client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 0x0000_0002;
/// All client flags defined by the spec.
pub const CLIENT_FLAGS_KNOWN: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

// ---------------------------------------------------------------------------
// Transmission flags (16 bits, server -> client)
// ---------------------------------------------------------------------------

/// Bit 0: MUST always be set.
pub const FLAG_HAS_FLAGS: u16 = 0x0001;
/// Bit 1: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 0x0002;
/// Bit 2: `NBD_CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 0x0004;
/// Bit 3: `NBD_CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 0x0008;
/// Bit 4: the export behaves like a rotational medium.
pub const FLAG_ROTATIONAL: u16 = 0x0010;
/// Bit 5: `NBD_CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 0x0020;
/// Bit 6: `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE` are supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 0x0040;
/// Bit 7: `NBD_CMD_FLAG_DF` is supported on reads.
pub const FLAG_SEND_DF: u16 = 0x0080;
/// Bit 8: the server's cache is shared among connections.
pub const FLAG_CAN_MULTI_CONN: u16 = 0x0100;
/// Bit 9: `NBD_CMD_RESIZE` (experimental extension) is supported.
pub const FLAG_SEND_RESIZE: u16 = 0x0200;
/// Bit 10: `NBD_CMD_CACHE` is understood.
pub const FLAG_SEND_CACHE: u16 = 0x0400;
/// Bit 11: `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 0x0800;
/// Bit 12: `NBD_CMD_FLAG_PAYLOAD_LEN` on `NBD_CMD_BLOCK_STATUS` is
/// understood (only with extended headers).
pub const FLAG_BLOCK_STATUS_PAYLOAD: u16 = 0x1000;

// ---------------------------------------------------------------------------
// Option codes
// ---------------------------------------------------------------------------

/// `NBD_OPT_EXPORT_NAME`: choose an export and enter transmission.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`: abort negotiation (soft disconnect).
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`: list exports.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_PEEK_EXPORT`: withdrawn extension, not in use.
pub const OPT_PEEK_EXPORT: u32 = 4;
/// `NBD_OPT_STARTTLS`: upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`: query export details.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`: query export details and enter transmission.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`: negotiate structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// `NBD_OPT_EXTENDED_HEADERS`: negotiate extended headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------------------
// Option reply types
// ---------------------------------------------------------------------------

/// Bit 31 set in every option error reply type.
pub const REP_FLAG_ERROR: u32 = 0x8000_0000;
/// `NBD_REP_ACK`: option accepted / list finished.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`: one export in an `NBD_OPT_LIST` reply.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`: one information item for `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// `NBD_REP_ERR_UNSUP`: option unknown to the server.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// `NBD_REP_ERR_POLICY`: forbidden by server policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// `NBD_REP_ERR_INVALID`: syntactically or semantically invalid option.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// `NBD_REP_ERR_PLATFORM`: not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// `NBD_REP_ERR_TLS_REQD`: TLS must be negotiated first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// `NBD_REP_ERR_UNKNOWN`: the requested export is not available.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// `NBD_REP_ERR_BLOCK_SIZE_REQD`: client must request block sizes.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// `NBD_REP_ERR_TOO_BIG`: request or reply too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
/// `NBD_REP_ERR_EXT_HEADER_REQD`: extended headers required.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// ---------------------------------------------------------------------------
// Information types (NBD_REP_INFO)
// ---------------------------------------------------------------------------

/// `NBD_INFO_EXPORT`: export size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`: canonical export name.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`: human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`: disconnect.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_CACHE`.
pub const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;
/// `NBD_CMD_RESIZE` (experimental extension).
pub const CMD_RESIZE: u16 = 8;

// ---------------------------------------------------------------------------
// Command flags
// ---------------------------------------------------------------------------

/// Bit 0: force unit access.
pub const CMD_FLAG_FUA: u16 = 0x0001;
/// Bit 1: do not punch a hole (`NBD_CMD_WRITE_ZEROES`).
pub const CMD_FLAG_NO_HOLE: u16 = 0x0002;
/// Bit 2: do not fragment the read reply (`NBD_CMD_READ`).
pub const CMD_FLAG_DF: u16 = 0x0004;
/// Bit 3: one extent per context (`NBD_CMD_BLOCK_STATUS`).
pub const CMD_FLAG_REQ_ONE: u16 = 0x0008;
/// Bit 4: fail fast if zeroing is slow (`NBD_CMD_WRITE_ZEROES`).
pub const CMD_FLAG_FAST_ZERO: u16 = 0x0010;
/// Bit 5: the length field is a payload length (extended headers only).
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 0x0020;
/// All command flags defined by the spec.
pub const CMD_FLAGS_KNOWN: u16 = CMD_FLAG_FUA
    | CMD_FLAG_NO_HOLE
    | CMD_FLAG_DF
    | CMD_FLAG_REQ_ONE
    | CMD_FLAG_FAST_ZERO
    | CMD_FLAG_PAYLOAD_LEN;

// ---------------------------------------------------------------------------
// Structured / extended reply flags and types
// ---------------------------------------------------------------------------

/// Reply flag bit 0: this is the final chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 0x0001;
/// Bit 15 set in every error chunk type.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 0x8000;
/// `NBD_REPLY_TYPE_NONE`: empty final chunk.
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`: zeroes at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`: 32-bit block status descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`: 64-bit block status descriptors.
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// `NBD_REPLY_TYPE_ERROR` (2^15 + 1).
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET` (2^15 + 2).
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

// ---------------------------------------------------------------------------
// Error values
// ---------------------------------------------------------------------------

/// `NBD_EPERM`: operation not permitted.
pub const EPERM: u32 = 1;
/// `NBD_EIO`: input/output error.
pub const EIO: u32 = 5;
/// `NBD_ENOMEM`: cannot allocate memory.
pub const ENOMEM: u32 = 12;
/// `NBD_EINVAL`: invalid argument.
pub const EINVAL: u32 = 22;
/// `NBD_ENOSPC`: no space left on device.
pub const ENOSPC: u32 = 28;
/// `NBD_EOVERFLOW`: value too large.
pub const EOVERFLOW: u32 = 75;
/// `NBD_ENOTSUP`: operation not supported.
pub const ENOTSUP: u32 = 95;
/// `NBD_ESHUTDOWN`: server is shutting down.
pub const ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------
// Metadata contexts
// ---------------------------------------------------------------------------

/// Name of the `base:allocation` metadata context.
pub const META_CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// `NBD_STATE_HOLE` (bit 0 of `base:allocation` status): unallocated.
pub const STATE_HOLE: u32 = 0x0000_0001;
/// `NBD_STATE_ZERO` (bit 1 of `base:allocation` status): reads as zero.
pub const STATE_ZERO: u32 = 0x0000_0002;
