//! Transmission-phase request validation.
//!
//! [`validate_request`] decides, before any I/O, whether a decoded request
//! is acceptable for the negotiated session and returns the NBD error code
//! to reply with otherwise. It does not consume payloads: whatever the
//! outcome, the server must first read (or discard) the
//! [`Request::payload_len`] bytes following the header, or close the
//! connection. `NBD_CMD_DISC` has no reply.

use crate::proto::consts::{self, EINVAL, ENOSPC, EPERM};
use crate::proto::error::DecodeError;
use crate::proto::request::{Command, Request};
use crate::proto::wire::{Reader, put_u32, put_u64};

/// Largest `NBD_CMD_READ` / `NBD_CMD_WRITE` length (and request payload)
/// accepted by default: 32 MiB, the portable limit of the spec.
pub const MAX_PAYLOAD: u32 = consts::DEFAULT_MAX_PAYLOAD;

/// What was negotiated for the session, as needed to validate requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransmissionContext {
    /// Export size in bytes.
    pub export_size: u64,
    /// Transmission flags sent to the client (`FLAG_*`).
    pub export_flags: u16,
    /// Structured replies were negotiated.
    pub structured_replies: bool,
    /// Extended headers were negotiated.
    pub extended_headers: bool,
    /// At least one metadata context is selected (`NBD_CMD_BLOCK_STATUS`
    /// allowed).
    pub block_status: bool,
    /// Minimum block size; offsets and lengths must be multiples of it
    /// (1 disables the check). Values of 0 are treated as 1.
    pub min_block_size: u32,
    /// Largest read/write length and request payload accepted.
    pub max_payload: u32,
}

impl TransmissionContext {
    /// A context with no optional features negotiated, minimum block size
    /// 1 and [`MAX_PAYLOAD`].
    pub fn new(export_size: u64, export_flags: u16) -> Self {
        TransmissionContext {
            export_size,
            export_flags,
            structured_replies: false,
            extended_headers: false,
            block_status: false,
            min_block_size: consts::DEFAULT_MIN_BLOCK_SIZE,
            max_payload: MAX_PAYLOAD,
        }
    }

    fn has(&self, flag: u16) -> bool {
        self.export_flags & flag != 0
    }

    fn read_only(&self) -> bool {
        self.has(consts::FLAG_READ_ONLY)
    }
}

/// Command flags a command may carry in this context; any other bit is
/// rejected with `NBD_EINVAL`.
fn allowed_flags(cmd: Command, ctx: &TransmissionContext) -> u16 {
    let mut allowed = 0;
    // FUA is valid on every command once NBD_FLAG_SEND_FUA is advertised.
    if ctx.has(consts::FLAG_SEND_FUA) {
        allowed |= consts::CMD_FLAG_FUA;
    }
    match cmd {
        Command::Read => {
            if ctx.has(consts::FLAG_SEND_DF) {
                allowed |= consts::CMD_FLAG_DF;
            }
        }
        Command::Write => {
            if ctx.extended_headers {
                allowed |= consts::CMD_FLAG_PAYLOAD_LEN;
            }
        }
        Command::WriteZeroes => {
            allowed |= consts::CMD_FLAG_NO_HOLE;
            if ctx.has(consts::FLAG_SEND_FAST_ZERO) {
                allowed |= consts::CMD_FLAG_FAST_ZERO;
            }
        }
        Command::BlockStatus => {
            allowed |= consts::CMD_FLAG_REQ_ONE;
            if ctx.extended_headers && ctx.has(consts::FLAG_BLOCK_STATUS_PAYLOAD) {
                allowed |= consts::CMD_FLAG_PAYLOAD_LEN;
            }
        }
        Command::Disc
        | Command::Flush
        | Command::Trim
        | Command::Cache
        | Command::Resize
        | Command::Unknown(_) => {}
    }
    allowed
}

/// Whether the export (as advertised) supports the command at all.
fn command_supported(cmd: Command, ctx: &TransmissionContext) -> bool {
    match cmd {
        Command::Read | Command::Write | Command::Disc => true,
        Command::Flush => ctx.has(consts::FLAG_SEND_FLUSH),
        Command::Trim => ctx.has(consts::FLAG_SEND_TRIM),
        Command::WriteZeroes => ctx.has(consts::FLAG_SEND_WRITE_ZEROES),
        // Some clients send NBD_CMD_CACHE without the flag being advertised;
        // the spec lets servers accept it.
        Command::Cache => true,
        Command::BlockStatus => {
            (ctx.structured_replies || ctx.extended_headers) && ctx.block_status
        }
        Command::Resize => ctx.has(consts::FLAG_SEND_RESIZE),
        Command::Unknown(_) => false,
    }
}

/// Checks that `[offset, offset + length)` lies within the export.
///
/// Out-of-range writes (`NBD_CMD_WRITE`, `NBD_CMD_WRITE_ZEROES`) fail with
/// `NBD_ENOSPC`, everything else (`READ`, `TRIM`, `CACHE`,
/// `BLOCK_STATUS`, ...) with `NBD_EINVAL`, as the spec recommends. An
/// `offset + length` that overflows 64 bits is out of range.
pub fn validate_range(
    command: Command,
    offset: u64,
    length: u64,
    export_size: u64,
) -> Result<(), u32> {
    let in_range = offset
        .checked_add(length)
        .is_some_and(|end| end <= export_size);
    if in_range {
        Ok(())
    } else if matches!(command, Command::Write | Command::WriteZeroes) {
        Err(ENOSPC)
    } else {
        Err(EINVAL)
    }
}

fn aligned(value: u64, block: u32) -> bool {
    match u64::from(block) {
        0 | 1 => true,
        b => value.is_multiple_of(b),
    }
}

/// Validates a decoded request against the session and returns the NBD
/// error to reply with if it must be refused.
///
/// Checks, in order:
/// 1. the command is known and advertised (`NBD_EINVAL` otherwise; unknown
///    commands, `FLUSH`/`TRIM`/`WRITE_ZEROES`/`RESIZE` without their
///    transmission flag, `BLOCK_STATUS` without structured replies or
///    extended headers plus a selected metadata context);
/// 2. the command flags: unknown bits, flags not documented for the
///    command, `FUA` without `NBD_FLAG_SEND_FUA`, `DF` without
///    `NBD_FLAG_SEND_DF`, `FAST_ZERO` without `NBD_FLAG_SEND_FAST_ZERO`,
///    `PAYLOAD_LEN` in compact mode or on commands other than `WRITE` and
///    (with `NBD_FLAG_BLOCK_STATUS_PAYLOAD`) `BLOCK_STATUS` →
///    `NBD_EINVAL`;
/// 3. writes (`WRITE`, `TRIM`, `WRITE_ZEROES`, `RESIZE`) on a read-only
///    export → `NBD_EPERM`;
/// 4. `READ`/`WRITE` lengths and any request payload above
///    `ctx.max_payload` → `NBD_EINVAL` (a `BLOCK_STATUS` payload must also
///    be `8 + 4*n` bytes);
/// 5. alignment of offset and length to `ctx.min_block_size` →
///    `NBD_EINVAL`;
/// 6. the range check of [`validate_range`] (`NBD_ENOSPC` for writes,
///    `NBD_EINVAL` otherwise).
///
/// `DISC` and `FLUSH` ignore their (reserved) offset and length. A
/// `BLOCK_STATUS` with a payload carries its effect length in the payload,
/// so its range is not checked here: decode it with
/// [`decode_block_status_payload`] and call [`validate_range`]. In extended
/// mode a `WRITE` without `NBD_CMD_FLAG_PAYLOAD_LEN` is tolerated (its
/// length is still the payload length). Zero lengths are accepted (the
/// spec leaves their effect unspecified but says not to disconnect).
pub fn validate_request(req: &Request, ctx: &TransmissionContext) -> Result<(), u32> {
    let cmd = req.command;
    if !command_supported(cmd, ctx) {
        return Err(EINVAL);
    }
    if req.flags & !allowed_flags(cmd, ctx) != 0 {
        return Err(EINVAL);
    }
    let writes = matches!(
        cmd,
        Command::Write | Command::Trim | Command::WriteZeroes | Command::Resize
    );
    if writes && ctx.read_only() {
        return Err(EPERM);
    }
    let max_payload = u64::from(ctx.max_payload);
    let payload = req.payload_len(ctx.extended_headers);
    if payload > max_payload {
        return Err(EINVAL);
    }
    let has_payload_len = ctx.extended_headers && req.has_flags(consts::CMD_FLAG_PAYLOAD_LEN);
    match cmd {
        Command::Disc | Command::Flush => Ok(()),
        Command::Resize => Ok(()),
        Command::BlockStatus if has_payload_len => {
            let ids = req.length.checked_sub(8).ok_or(EINVAL)?;
            if ids == 0 || !ids.is_multiple_of(4) {
                return Err(EINVAL);
            }
            if !aligned(req.offset, ctx.min_block_size) {
                return Err(EINVAL);
            }
            Ok(())
        }
        _ => {
            if cmd == Command::Read && req.length > max_payload {
                return Err(EINVAL);
            }
            if !aligned(req.offset, ctx.min_block_size) || !aligned(req.length, ctx.min_block_size)
            {
                return Err(EINVAL);
            }
            validate_range(cmd, req.offset, req.length, ctx.export_size)
        }
    }
}

/// The payload of an `NBD_CMD_BLOCK_STATUS` request sent with
/// `NBD_CMD_FLAG_PAYLOAD_LEN` (extended headers and
/// `NBD_FLAG_BLOCK_STATUS_PAYLOAD` only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatusPayload {
    /// The effect length (the range of interest is `offset..offset +
    /// effect_length`).
    pub effect_length: u64,
    /// Metadata context ids the client wants answers for.
    pub context_ids: Vec<u32>,
}

/// Decodes a block status request payload: u64 effect length followed by
/// `n >= 1` u32 metadata context ids (`8 + 4*n` bytes).
///
/// The spec requires the server to fail requests with duplicate or unknown
/// ids with `NBD_EINVAL`; duplicates are rejected here, unknown ids are for
/// the caller to check.
pub fn decode_block_status_payload(payload: &[u8]) -> Result<BlockStatusPayload, DecodeError> {
    let mut r = Reader::new(payload);
    let effect_length = r.u64().ok_or(DecodeError::InvalidBlockStatusPayload(
        "shorter than the effect length",
    ))?;
    if r.is_empty() || !r.remaining().is_multiple_of(4) {
        return Err(DecodeError::InvalidBlockStatusPayload(
            "length must be 8 + 4*n with n >= 1",
        ));
    }
    let mut context_ids = Vec::with_capacity(r.remaining() / 4);
    while let Some(id) = r.u32() {
        if context_ids.contains(&id) {
            return Err(DecodeError::InvalidBlockStatusPayload(
                "duplicate metadata context id",
            ));
        }
        context_ids.push(id);
    }
    Ok(BlockStatusPayload {
        effect_length,
        context_ids,
    })
}

/// Encodes a block status request payload (client side).
pub fn encode_block_status_payload(effect_length: u64, context_ids: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(context_ids.len().saturating_mul(4).saturating_add(8));
    put_u64(&mut out, effect_length);
    for &id in context_ids {
        put_u32(&mut out, id);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::proto::consts::*;

    const SIZE: u64 = 1 << 20;

    fn full_ctx() -> TransmissionContext {
        TransmissionContext {
            structured_replies: true,
            block_status: true,
            ..TransmissionContext::new(
                SIZE,
                FLAG_HAS_FLAGS
                    | FLAG_SEND_FLUSH
                    | FLAG_SEND_FUA
                    | FLAG_SEND_TRIM
                    | FLAG_SEND_WRITE_ZEROES
                    | FLAG_SEND_DF
                    | FLAG_SEND_CACHE
                    | FLAG_SEND_FAST_ZERO,
            )
        }
    }

    fn req(command: Command, flags: u16, offset: u64, length: u64) -> Request {
        Request {
            flags,
            command,
            cookie: 1,
            offset,
            length,
        }
    }

    #[test]
    fn command_table_full_export() {
        use Command::*;
        let ctx = full_ctx();
        let cases: &[(Request, Result<(), u32>)] = &[
            (req(Read, 0, 0, 4096), Ok(())),
            (req(Read, CMD_FLAG_FUA, 0, 4096), Ok(())),
            (req(Read, CMD_FLAG_DF, 0, 4096), Ok(())),
            (req(Read, CMD_FLAG_NO_HOLE, 0, 4096), Err(EINVAL)),
            (req(Read, CMD_FLAG_REQ_ONE, 0, 4096), Err(EINVAL)),
            (req(Read, 0x0040, 0, 4096), Err(EINVAL)),
            (req(Read, CMD_FLAG_PAYLOAD_LEN, 0, 4096), Err(EINVAL)),
            (req(Read, 0, SIZE - 512, 512), Ok(())),
            (req(Read, 0, SIZE - 512, 513), Err(EINVAL)),
            (req(Read, 0, SIZE, 0), Ok(())),
            (req(Read, 0, SIZE + 1, 0), Err(EINVAL)),
            (req(Read, 0, u64::MAX, 2), Err(EINVAL)),
            (req(Write, 0, 0, 4096), Ok(())),
            (req(Write, CMD_FLAG_FUA, 0, 4096), Ok(())),
            (req(Write, CMD_FLAG_DF, 0, 4096), Err(EINVAL)),
            (req(Write, CMD_FLAG_PAYLOAD_LEN, 0, 4096), Err(EINVAL)),
            (req(Write, 0, SIZE - 1, 2), Err(ENOSPC)),
            (req(Write, 0, u64::MAX, 1), Err(ENOSPC)),
            (req(Disc, 0, 0, 0), Ok(())),
            (req(Disc, 0, 5, 5), Ok(())),
            (req(Flush, 0, 0, 0), Ok(())),
            (req(Flush, CMD_FLAG_FUA, 0, 0), Ok(())),
            (req(Flush, CMD_FLAG_NO_HOLE, 0, 0), Err(EINVAL)),
            (req(Trim, 0, 0, SIZE), Ok(())),
            (req(Trim, CMD_FLAG_FUA, 0, SIZE), Ok(())),
            (req(Trim, 0, 1, SIZE), Err(EINVAL)),
            (req(Cache, 0, 0, 4096), Ok(())),
            (req(Cache, 0, SIZE, 1), Err(EINVAL)),
            (req(Cache, CMD_FLAG_DF, 0, 1), Err(EINVAL)),
            (req(WriteZeroes, 0, 0, SIZE), Ok(())),
            (req(WriteZeroes, CMD_FLAG_NO_HOLE, 0, SIZE), Ok(())),
            (req(WriteZeroes, CMD_FLAG_FAST_ZERO, 0, SIZE), Ok(())),
            (
                req(
                    WriteZeroes,
                    CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
                    0,
                    1,
                ),
                Ok(()),
            ),
            (req(WriteZeroes, 0, 0, SIZE + 1), Err(ENOSPC)),
            (req(WriteZeroes, CMD_FLAG_DF, 0, 1), Err(EINVAL)),
            (req(BlockStatus, 0, 0, SIZE), Ok(())),
            (req(BlockStatus, CMD_FLAG_REQ_ONE, 0, 512), Ok(())),
            (req(BlockStatus, 0, 0, SIZE + 1), Err(EINVAL)),
            (req(BlockStatus, CMD_FLAG_NO_HOLE, 0, 1), Err(EINVAL)),
            (req(BlockStatus, CMD_FLAG_PAYLOAD_LEN, 0, 12), Err(EINVAL)),
            (req(Resize, 0, 0, 0), Err(EINVAL)),
            (req(Unknown(9), 0, 0, 0), Err(EINVAL)),
            (req(Unknown(0xffff), 0, 0, 0), Err(EINVAL)),
        ];
        for (r, expected) in cases {
            assert_eq!(validate_request(r, &ctx), *expected, "{r:?}");
        }
    }

    #[test]
    fn minimal_export() {
        use Command::*;
        let ctx = TransmissionContext::new(SIZE, FLAG_HAS_FLAGS);
        let cases: &[(Request, Result<(), u32>)] = &[
            (req(Read, 0, 0, 512), Ok(())),
            (req(Write, 0, 0, 512), Ok(())),
            (req(Read, CMD_FLAG_FUA, 0, 512), Err(EINVAL)),
            (req(Read, CMD_FLAG_DF, 0, 512), Err(EINVAL)),
            (req(Flush, 0, 0, 0), Err(EINVAL)),
            (req(Trim, 0, 0, 512), Err(EINVAL)),
            (req(WriteZeroes, 0, 0, 512), Err(EINVAL)),
            (req(BlockStatus, 0, 0, 512), Err(EINVAL)),
            (req(Cache, 0, 0, 512), Ok(())),
            (req(Disc, 0, 0, 0), Ok(())),
        ];
        for (r, expected) in cases {
            assert_eq!(validate_request(r, &ctx), *expected, "{r:?}");
        }
        // Block status needs a metadata context as well as structured replies.
        let mut ctx = ctx;
        ctx.structured_replies = true;
        assert_eq!(
            validate_request(&req(BlockStatus, 0, 0, 1), &ctx),
            Err(EINVAL)
        );
        ctx.block_status = true;
        assert_eq!(validate_request(&req(BlockStatus, 0, 0, 1), &ctx), Ok(()));
        ctx.structured_replies = false;
        ctx.extended_headers = true;
        assert_eq!(validate_request(&req(BlockStatus, 0, 0, 1), &ctx), Ok(()));
        // Fast zero needs its own flag.
        let ctx = TransmissionContext::new(SIZE, FLAG_HAS_FLAGS | FLAG_SEND_WRITE_ZEROES);
        assert_eq!(
            validate_request(&req(WriteZeroes, CMD_FLAG_FAST_ZERO, 0, 1), &ctx),
            Err(EINVAL)
        );
        // Resize only with its flag, and it is a write.
        let ctx = TransmissionContext::new(SIZE, FLAG_HAS_FLAGS | FLAG_SEND_RESIZE);
        assert_eq!(validate_request(&req(Resize, 0, 0, 0), &ctx), Ok(()));
    }

    #[test]
    fn read_only_export() {
        use Command::*;
        let mut ctx = full_ctx();
        ctx.export_flags |= FLAG_READ_ONLY | FLAG_SEND_RESIZE;
        for (r, expected) in [
            (req(Read, 0, 0, 512), Ok(())),
            (req(Write, 0, 0, 512), Err(EPERM)),
            (req(Write, 0, SIZE, 512), Err(EPERM)),
            (req(Trim, 0, 0, 512), Err(EPERM)),
            (req(WriteZeroes, 0, 0, 512), Err(EPERM)),
            (req(Resize, 0, 0, 0), Err(EPERM)),
            (req(Flush, 0, 0, 0), Ok(())),
            (req(Cache, 0, 0, 512), Ok(())),
            (req(BlockStatus, 0, 0, 512), Ok(())),
        ] {
            assert_eq!(validate_request(&r, &ctx), expected, "{r:?}");
        }
    }

    #[test]
    fn payload_limits() {
        use Command::*;
        let ctx = full_ctx();
        let max = u64::from(MAX_PAYLOAD);
        let mut big = full_ctx();
        big.export_size = 1 << 40;
        assert_eq!(validate_request(&req(Read, 0, 0, max), &big), Ok(()));
        assert_eq!(
            validate_request(&req(Read, 0, 0, max + 1), &big),
            Err(EINVAL)
        );
        assert_eq!(validate_request(&req(Write, 0, 0, max), &big), Ok(()));
        assert_eq!(
            validate_request(&req(Write, 0, 0, max + 1), &big),
            Err(EINVAL)
        );
        // Commands without payload may exceed the payload limit.
        assert_eq!(validate_request(&req(Trim, 0, 0, max + 1), &big), Ok(()));
        assert_eq!(
            validate_request(&req(WriteZeroes, 0, 0, 1 << 39), &big),
            Ok(())
        );
        let mut small = ctx;
        small.max_payload = 4096;
        assert_eq!(
            validate_request(&req(Read, 0, 0, 4097), &small),
            Err(EINVAL)
        );
    }

    #[test]
    fn alignment() {
        use Command::*;
        let mut ctx = full_ctx();
        ctx.min_block_size = 512;
        assert_eq!(validate_request(&req(Read, 0, 512, 1024), &ctx), Ok(()));
        assert_eq!(
            validate_request(&req(Read, 0, 511, 1024), &ctx),
            Err(EINVAL)
        );
        assert_eq!(
            validate_request(&req(Write, 0, 512, 100), &ctx),
            Err(EINVAL)
        );
        assert_eq!(validate_request(&req(Trim, 0, 1, 512), &ctx), Err(EINVAL));
        assert_eq!(validate_request(&req(Flush, 0, 1, 1), &ctx), Ok(()));
        ctx.min_block_size = 0;
        assert_eq!(validate_request(&req(Read, 0, 1, 1), &ctx), Ok(()));
    }

    #[test]
    fn extended_mode() {
        use Command::*;
        let mut ctx = full_ctx();
        ctx.extended_headers = true;
        ctx.export_size = 1 << 40;
        let cases: &[(Request, Result<(), u32>)] = &[
            (req(Write, CMD_FLAG_PAYLOAD_LEN, 0, 4096), Ok(())),
            (req(Write, 0, 0, 4096), Ok(())),
            (req(Trim, 0, 0, 1 << 36), Ok(())),
            (req(WriteZeroes, 0, 0, 1 << 36), Ok(())),
            (req(BlockStatus, 0, 0, 1 << 36), Ok(())),
            (req(Trim, CMD_FLAG_PAYLOAD_LEN, 0, 8), Err(EINVAL)),
            // Payload form needs NBD_FLAG_BLOCK_STATUS_PAYLOAD.
            (req(BlockStatus, CMD_FLAG_PAYLOAD_LEN, 0, 12), Err(EINVAL)),
        ];
        for (r, expected) in cases {
            assert_eq!(validate_request(r, &ctx), *expected, "{r:?}");
        }
        ctx.export_flags |= FLAG_BLOCK_STATUS_PAYLOAD;
        for (len, expected) in [
            (12, Ok(())),
            (16, Ok(())),
            (8, Err(EINVAL)),
            (0, Err(EINVAL)),
            (13, Err(EINVAL)),
            (u64::from(MAX_PAYLOAD) + 4, Err(EINVAL)),
        ] {
            let r = req(
                BlockStatus,
                CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_REQ_ONE,
                1 << 39,
                len,
            );
            assert_eq!(validate_request(&r, &ctx), expected, "len {len}");
        }
    }

    #[test]
    fn range_errors() {
        use Command::*;
        for (cmd, code) in [
            (Read, EINVAL),
            (Write, ENOSPC),
            (Trim, EINVAL),
            (Cache, EINVAL),
            (WriteZeroes, ENOSPC),
            (BlockStatus, EINVAL),
        ] {
            assert_eq!(validate_range(cmd, 0, 101, 100), Err(code));
            assert_eq!(validate_range(cmd, u64::MAX, 1, u64::MAX), Err(code));
            assert_eq!(validate_range(cmd, 0, 100, 100), Ok(()));
            assert_eq!(validate_range(cmd, u64::MAX, 0, u64::MAX), Ok(()));
        }
    }

    #[test]
    fn block_status_payload() {
        let bytes = encode_block_status_payload(1 << 33, &[1, 7]);
        assert_eq!(bytes, [0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 7]);
        assert_eq!(
            decode_block_status_payload(&bytes),
            Ok(BlockStatusPayload {
                effect_length: 1 << 33,
                context_ids: vec![1, 7]
            })
        );
        for bad in [
            &[][..],
            &[0; 7][..],
            &[0; 8][..],
            &[0; 13][..],
            &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 0, 3][..],
        ] {
            assert!(decode_block_status_payload(bad).is_err(), "{bad:?}");
        }
    }
}
