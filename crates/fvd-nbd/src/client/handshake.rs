//! Option negotiation, client side (fixed newstyle).
//!
//! A client connection runs the usual sequence: `STARTTLS` when TLS
//! is configured, extended headers if the server offers them (else
//! structured replies), the wanted metadata contexts (`base:allocation`),
//! then `NBD_OPT_GO` asking for the block size constraints, falling back
//! to `NBD_OPT_EXPORT_NAME` for servers that do not know `NBD_OPT_GO`.
//!
//! The lower-level methods ([`Handshake::option_raw`],
//! [`Handshake::send_raw`]) let tests of a server send any option, or any
//! bytes, and see the replies as decoded by the codec.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::error::{Failure, option_error_name};
use super::tls::TlsConfig;
use crate::proto::consts;
use crate::proto::handshake::{
    self, ClientOption, InfoReply, OptionReply, OptionReplyHeader, decode_option_reply,
    decode_option_reply_header,
};
use crate::stream::Stream;

/// Largest read sent as one request, whatever the server allows.
pub const MAX_READ: u32 = 32 << 20;

/// Largest option reply payload accepted.
const MAX_OPTION_REPLY: u32 = 16 << 20;

/// What to negotiate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiation {
    /// Ask for structured replies (else simple replies only).
    pub structured_replies: bool,
    /// Ask for extended headers (64-bit lengths; implies structured
    /// replies).
    pub extended_headers: bool,
    /// Metadata contexts to select (needs structured replies).
    pub meta_contexts: Vec<String>,
}

impl Default for Negotiation {
    fn default() -> Self {
        Negotiation {
            structured_replies: true,
            extended_headers: true,
            meta_contexts: vec![consts::META_CONTEXT_BASE_ALLOCATION.to_string()],
        }
    }
}

/// What the server told us about the export, and what was negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`FLAG_*`).
    pub flags: u16,
    /// Minimum block size (requests are aligned to it).
    pub min_block: u32,
    /// Preferred block size.
    pub preferred_block: u32,
    /// Maximum block size (reads are split at it; at most [`MAX_READ`]).
    pub max_block: u32,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Extended headers were negotiated.
    pub extended: bool,
    /// Selected metadata contexts: `(id, name)`.
    pub contexts: Vec<(u32, String)>,
    /// Id of the `base:allocation` context, if selected.
    pub allocation_context: Option<u32>,
    /// Negotiated with `NBD_OPT_GO` (false: `NBD_OPT_EXPORT_NAME`).
    pub used_go: bool,
    /// The connection is encrypted.
    pub tls: bool,
}

impl ExportInfo {
    /// Whether the export has the transmission flag `flag`.
    pub fn has_flag(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// The handshake of one connection, from the greeting to transmission.
#[derive(Debug)]
pub struct Handshake {
    stream: Stream,
    server_flags: u16,
    target: String,
}

impl Handshake {
    /// Read the server's greeting on `stream` and send the client flags:
    /// `client_flags`, or by default fixed newstyle plus `NO_ZEROES` when
    /// the server offers it. `target` names the server in messages.
    pub async fn start(
        stream: Stream,
        target: &str,
        client_flags: Option<u32>,
    ) -> io::Result<Handshake> {
        Self::begin(stream, target, client_flags)
            .await
            .map_err(|f| f.to_io())
    }

    pub(crate) async fn begin(
        mut stream: Stream,
        target: &str,
        client_flags: Option<u32>,
    ) -> Result<Handshake, Failure> {
        let io = |e: io::Error| Failure::io(&format!("{target}: handshake"), &e);
        let mut g = [0u8; consts::GREETING_LEN];
        stream.read_exact(&mut g).await.map_err(io)?;
        let server_flags = handshake::decode_greeting(&g).map_err(|e| {
            Failure::permanent(
                io::ErrorKind::InvalidData,
                format!("{target}: not an NBD server speaking the newstyle protocol ({e})"),
            )
        })?;
        let flags = match client_flags {
            Some(f) => f,
            None => {
                if server_flags & consts::FLAG_FIXED_NEWSTYLE == 0 {
                    return Err(Failure::permanent(
                        io::ErrorKind::InvalidData,
                        format!("{target}: the server does not support fixed newstyle negotiation"),
                    ));
                }
                let mut f = consts::FLAG_C_FIXED_NEWSTYLE;
                if server_flags & consts::FLAG_NO_ZEROES != 0 {
                    f |= consts::FLAG_C_NO_ZEROES;
                }
                f
            }
        };
        stream
            .write_all(&handshake::encode_client_flags(flags))
            .await
            .map_err(io)?;
        Ok(Handshake {
            stream,
            server_flags,
            target: target.to_string(),
        })
    }

    /// The handshake flags of the server's greeting.
    pub fn server_flags(&self) -> u16 {
        self.server_flags
    }

    /// The stream, to send or read anything at all.
    pub fn stream_mut(&mut self) -> &mut Stream {
        &mut self.stream
    }

    /// The stream, ending the handshake.
    pub fn into_stream(self) -> Stream {
        self.stream
    }

    /// Send `bytes` as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Send option `code` with `payload` as they are, and read the replies
    /// up to the final one (`ACK` or an error).
    pub async fn option_raw(
        &mut self,
        code: u32,
        payload: &[u8],
    ) -> io::Result<Vec<(OptionReplyHeader, OptionReply)>> {
        self.exchange(code, payload).await.map_err(|f| f.to_io())
    }

    fn io_failure(&self, e: &io::Error) -> Failure {
        Failure::io(&format!("{}: handshake", self.target), e)
    }

    /// A write failed because the server went away: what it said last (a
    /// TLS alert, say, such as a certificate it wanted) says more than the
    /// broken pipe.
    async fn why_gone(&mut self, write: io::Error) -> Failure {
        let mut b = [0u8; 1];
        let read =
            tokio::time::timeout(std::time::Duration::from_secs(1), self.stream.read(&mut b)).await;
        match read {
            Ok(Err(e)) => self.io_failure(&e),
            _ => self.io_failure(&write),
        }
    }

    fn protocol(&self, msg: impl std::fmt::Display) -> Failure {
        Failure::protocol(&self.target, msg)
    }

    async fn exchange(
        &mut self,
        code: u32,
        payload: &[u8],
    ) -> Result<Vec<(OptionReplyHeader, OptionReply)>, Failure> {
        let request = handshake::encode_option_request(code, payload)
            .map_err(|e| Failure::permanent(io::ErrorKind::InvalidInput, e.to_string()))?;
        if let Err(e) = self.stream.write_all(&request).await {
            return Err(self.why_gone(e).await);
        }
        let mut replies = Vec::new();
        loop {
            let (h, r) = self.read_option_reply(code).await?;
            let last = matches!(r, OptionReply::Ack | OptionReply::Error { .. });
            replies.push((h, r));
            if last {
                return Ok(replies);
            }
        }
    }

    async fn read_option_reply(
        &mut self,
        code: u32,
    ) -> Result<(OptionReplyHeader, OptionReply), Failure> {
        let mut h = [0u8; consts::OPTION_REPLY_HEADER_LEN];
        self.stream
            .read_exact(&mut h)
            .await
            .map_err(|e| self.io_failure(&e))?;
        let hdr = decode_option_reply_header(&h).map_err(|e| self.protocol(e))?;
        if hdr.option != code {
            return Err(self.protocol(format!(
                "reply to option {} while waiting for option {code}",
                hdr.option
            )));
        }
        if hdr.length > MAX_OPTION_REPLY {
            return Err(self.protocol(format!("option reply of {} bytes is too large", hdr.length)));
        }
        let mut payload = vec![0u8; usize::try_from(hdr.length).unwrap_or(0)];
        self.stream
            .read_exact(&mut payload)
            .await
            .map_err(|e| self.io_failure(&e))?;
        let reply = decode_option_reply(&hdr, &payload).map_err(|e| self.protocol(e))?;
        Ok((hdr, reply))
    }

    /// Upgrade to TLS with `NBD_OPT_STARTTLS`.
    async fn upgrade(mut self, tls: &TlsConfig) -> Result<Handshake, Failure> {
        let t = self.target.clone();
        match self.exchange(consts::OPT_STARTTLS, &[]).await?.pop() {
            Some((_, OptionReply::Ack)) => {}
            Some((
                _,
                OptionReply::Error {
                    reply_type,
                    message,
                },
            )) => {
                return Err(Failure::permanent(
                    io::ErrorKind::Unsupported,
                    format!(
                        "{t}: the server refused TLS: {}{}",
                        option_error_name(reply_type),
                        with_message(&message)
                    ),
                ));
            }
            other => return Err(self.protocol(format!("unexpected reply {other:?}"))),
        }
        let Stream::Plain(plain) = self.stream else {
            return Err(Failure::protocol(&t, "STARTTLS on a TLS connection"));
        };
        let stream = tls
            .connect(plain)
            .await
            .map_err(|e| Failure::permanent(e.kind(), format!("{t}: TLS handshake failed: {e}")))?;
        Ok(Handshake {
            stream,
            server_flags: self.server_flags,
            target: t,
        })
    }

    /// Negotiate as [`Negotiation`] says for `export` (optionally with TLS)
    /// and enter transmission: returns the stream and the export.
    pub(crate) async fn run(
        mut self,
        export: &str,
        want: &Negotiation,
        tls: Option<&TlsConfig>,
    ) -> Result<(Stream, ExportInfo), Failure> {
        if let Some(tls) = tls {
            self = self.upgrade(tls).await?;
        }
        let (structured, extended) = self.reply_style(want).await?;
        let contexts = if structured && !want.meta_contexts.is_empty() {
            self.select_contexts(export, &want.meta_contexts).await?
        } else {
            Vec::new()
        };
        let (size, flags, block, used_go) = self.go(export).await?;
        let (min_block, preferred_block, max_block) = self.block_sizes(block)?;
        if size > i64::MAX.unsigned_abs() {
            return Err(self.protocol(format!("export size {size} is too large")));
        }
        let allocation_context = contexts
            .iter()
            .find(|(_, n)| n == consts::META_CONTEXT_BASE_ALLOCATION)
            .map(|(id, _)| *id);
        let info = ExportInfo {
            size,
            flags,
            min_block,
            preferred_block,
            max_block,
            structured,
            extended,
            contexts,
            allocation_context,
            used_go,
            tls: self.stream.is_tls(),
        };
        Ok((self.stream, info))
    }

    /// Extended headers, else structured replies, as wanted and offered.
    async fn reply_style(&mut self, want: &Negotiation) -> Result<(bool, bool), Failure> {
        if want.extended_headers {
            match self
                .exchange(consts::OPT_EXTENDED_HEADERS, &[])
                .await?
                .pop()
            {
                Some((_, OptionReply::Ack)) => return Ok((true, true)),
                Some((_, OptionReply::Error { .. })) => {}
                other => return Err(self.protocol(format!("unexpected reply {other:?}"))),
            }
        }
        if want.structured_replies {
            match self
                .exchange(consts::OPT_STRUCTURED_REPLY, &[])
                .await?
                .pop()
            {
                Some((_, OptionReply::Ack)) => return Ok((true, false)),
                Some((_, OptionReply::Error { .. })) => {}
                other => return Err(self.protocol(format!("unexpected reply {other:?}"))),
            }
        }
        Ok((false, false))
    }

    fn no_such_export(&self, export: &str, message: &str) -> Failure {
        Failure::permanent(
            io::ErrorKind::NotFound,
            format!(
                "{}: the server has no export named '{export}'{}",
                self.target,
                with_message(message)
            ),
        )
    }

    async fn select_contexts(
        &mut self,
        export: &str,
        names: &[String],
    ) -> Result<Vec<(u32, String)>, Failure> {
        let option = ClientOption::SetMetaContext {
            export: export.to_string(),
            queries: names.to_vec(),
        };
        let payload = handshake::encode_option_payload(&option)
            .map_err(|e| Failure::permanent(io::ErrorKind::InvalidInput, e.to_string()))?;
        let mut contexts = Vec::new();
        for (_, reply) in self
            .exchange(consts::OPT_SET_META_CONTEXT, &payload)
            .await?
        {
            match reply {
                OptionReply::MetaContext { id, name } => {
                    if names.contains(&name) {
                        contexts.push((id, name));
                    }
                }
                OptionReply::Ack => {}
                OptionReply::Error {
                    reply_type,
                    message,
                } if reply_type == consts::REP_ERR_UNKNOWN => {
                    return Err(self.no_such_export(export, &message));
                }
                // No metadata contexts, then: everything reads as data.
                OptionReply::Error { .. } => return Ok(Vec::new()),
                other => return Err(self.protocol(format!("unexpected reply {other:?}"))),
            }
        }
        Ok(contexts)
    }

    /// `NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME`): size, flags, block sizes,
    /// and whether GO was used.
    async fn go(
        &mut self,
        export: &str,
    ) -> Result<(u64, u16, Option<(u32, u32, u32)>, bool), Failure> {
        let t = self.target.clone();
        let option = ClientOption::Go {
            name: export.to_string(),
            info_requests: vec![consts::INFO_BLOCK_SIZE],
        };
        let payload = handshake::encode_option_payload(&option)
            .map_err(|e| Failure::permanent(io::ErrorKind::InvalidInput, e.to_string()))?;
        let mut export_info = None;
        let mut block = None;
        for (_, reply) in self.exchange(consts::OPT_GO, &payload).await? {
            match reply {
                OptionReply::Info(InfoReply::Export { size, flags }) => {
                    export_info = Some((size, flags));
                }
                OptionReply::Info(InfoReply::BlockSize {
                    minimum,
                    preferred,
                    maximum,
                }) => block = Some((minimum, preferred, maximum)),
                OptionReply::Info(_) | OptionReply::Ack => {}
                OptionReply::Error {
                    reply_type,
                    message,
                } => {
                    return match reply_type {
                        consts::REP_ERR_UNSUP => {
                            let (size, flags) = self.export_name(export).await?;
                            Ok((size, flags, None, false))
                        }
                        consts::REP_ERR_UNKNOWN => Err(self.no_such_export(export, &message)),
                        consts::REP_ERR_TLS_REQD => Err(Failure::permanent(
                            io::ErrorKind::PermissionDenied,
                            format!("{t}: the server requires TLS{}", with_message(&message)),
                        )),
                        consts::REP_ERR_SHUTDOWN => Err(Failure::transient(
                            io::ErrorKind::ConnectionAborted,
                            format!("{t}: the server is shutting down"),
                        )),
                        other => Err(Failure::permanent(
                            io::ErrorKind::Other,
                            format!(
                                "{t}: the server refused export '{export}': {}{}",
                                option_error_name(other),
                                with_message(&message)
                            ),
                        )),
                    };
                }
                other => return Err(self.protocol(format!("unexpected reply {other:?}"))),
            }
        }
        match export_info {
            Some((size, flags)) => Ok((size, flags, block, true)),
            None => Err(self.protocol("the server did not send the export size")),
        }
    }

    async fn export_name(&mut self, export: &str) -> Result<(u64, u16), Failure> {
        let request = handshake::encode_option(&ClientOption::ExportName(export.to_string()))
            .map_err(|e| Failure::permanent(io::ErrorKind::InvalidInput, e.to_string()))?;
        self.stream
            .write_all(&request)
            .await
            .map_err(|e| self.io_failure(&e))?;
        let no_zeroes = self.server_flags & consts::FLAG_NO_ZEROES != 0;
        let len = if no_zeroes {
            10
        } else {
            10usize.saturating_add(consts::EXPORT_NAME_REPLY_ZEROES)
        };
        let mut buf = vec![0u8; len];
        if let Err(e) = self.stream.read_exact(&mut buf).await {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                return Err(self.no_such_export(export, "the server closed the connection"));
            }
            return Err(self.io_failure(&e));
        }
        handshake::decode_export_name_reply(&buf, no_zeroes).map_err(|e| self.protocol(e))
    }

    /// Checked `(minimum, preferred, maximum)` block sizes, the maximum cut
    /// to whole minimum blocks of at most [`MAX_READ`] bytes.
    fn block_sizes(&self, block: Option<(u32, u32, u32)>) -> Result<(u32, u32, u32), Failure> {
        let Some((min, pref, max)) = block else {
            return Ok((1, consts::DEFAULT_PREFERRED_BLOCK_SIZE, MAX_READ));
        };
        if min == 0 || !min.is_power_of_two() || min > 64 * 1024 {
            return Err(self.protocol(format!("invalid minimum block size {min}")));
        }
        if max < min {
            return Err(self.protocol(format!(
                "maximum block size {max} is below the minimum {min}"
            )));
        }
        let max = max.min(MAX_READ);
        let max = max.saturating_sub(max.checked_rem(min).unwrap_or(0));
        Ok((min, pref.max(min), max.max(min)))
    }
}

fn with_message(msg: &str) -> String {
    if msg.is_empty() {
        String::new()
    } else {
        format!(" ({msg})")
    }
}
