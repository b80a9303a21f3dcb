//! Option negotiation (fixed newstyle), server side.
//!
//! State machine, one option at a time:
//! * before TLS, when TLS is configured (FORCEDTLS): only `STARTTLS`
//!   (ACK, then the TLS handshake) and `ABORT` are served; any other option
//!   gets `NBD_REP_ERR_TLS_REQD`, and `EXPORT_NAME` (which cannot fail
//!   politely) closes the connection. After TLS is up the negotiation
//!   state starts over: structured replies, extended headers and metadata
//!   contexts must be negotiated again;
//! * `GO`/`EXPORT_NAME` on the configured export name end the
//!   negotiation; other names get `NBD_REP_ERR_UNKNOWN` (or, for
//!   `EXPORT_NAME`, a closed connection);
//! * unknown options get `NBD_REP_ERR_UNSUP` and the negotiation goes on;
//! * option payloads above [`MAX_OPTION_LEN`](crate::proto::handshake::MAX_OPTION_LEN) are read and dropped in
//!   small chunks and answered with `NBD_REP_ERR_TOO_BIG`;
//! * a client that did not set `NBD_FLAG_C_FIXED_NEWSTYLE` may only send
//!   `EXPORT_NAME`; anything else closes the connection.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{META_CONTEXT_ALLOCATION_DEPTH, Shared};
use crate::proto::consts::{self, META_CONTEXT_BASE_ALLOCATION};
use crate::proto::handshake::{
    self, ClientOption, decode_client_flags, decode_option, decode_option_header,
    encode_error_reply,
};
use crate::stream::Stream;

/// Metadata context id of `base:allocation`.
pub(crate) const META_ID_BASE_ALLOCATION: u32 = 0;
/// Metadata context id of `qemu:allocation-depth`.
pub(crate) const META_ID_ALLOCATION_DEPTH: u32 = 1;

/// What was negotiated for the transmission phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Session {
    /// Structured replies (also true with extended headers).
    pub(crate) structured: bool,
    /// Extended headers.
    pub(crate) extended: bool,
    /// `base:allocation` selected.
    pub(crate) meta_base: bool,
    /// `qemu:allocation-depth` selected.
    pub(crate) meta_depth: bool,
    /// The export's size as sent to the client (the image's size when it
    /// entered transmission; an online resize shows on reconnect).
    pub(crate) size: u64,
}

impl Session {
    pub(crate) fn any_meta(&self) -> bool {
        self.meta_base || self.meta_depth
    }
}

/// What one option did to the negotiation.
enum Step {
    /// Keep negotiating.
    Continue,
    /// Enter transmission (after `GO` or `EXPORT_NAME`).
    Transmission,
    /// Upgrade to TLS, then keep negotiating.
    StartTls,
    /// Close the connection.
    Close,
}

/// Negotiate on `conn`. Returns the (possibly TLS-wrapped) connection and
/// the session when the client enters transmission, `None` when the
/// negotiation ended without it (abort, violation, refused export name).
pub(crate) async fn negotiate(
    mut conn: Stream,
    shared: &Arc<Shared>,
) -> io::Result<Option<(Stream, Session)>> {
    let advertised = consts::FLAG_FIXED_NEWSTYLE | consts::FLAG_NO_ZEROES;
    conn.write_all(&handshake::encode_greeting(advertised))
        .await?;
    conn.flush().await?;
    let mut flags = [0u8; consts::CLIENT_FLAGS_LEN];
    conn.read_exact(&mut flags).await?;
    let client_flags = match decode_client_flags(&flags, advertised) {
        Ok(f) => f,
        Err(e) => {
            shared.log(format_args!("client flags refused: {e}"));
            return Ok(None);
        }
    };
    let mut state = State {
        shared,
        fixed: client_flags & consts::FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: client_flags & consts::FLAG_C_NO_ZEROES != 0,
        tls_active: false,
        session: Session::default(),
    };
    loop {
        match state.one_option(&mut conn).await? {
            Step::Continue => {}
            Step::Transmission => return Ok(Some((conn, state.session))),
            Step::Close => {
                let _ = conn.shutdown().await;
                return Ok(None);
            }
            Step::StartTls => {
                let Some(acceptor) = shared.tls.clone() else {
                    return Ok(None);
                };
                let plain = match conn {
                    Stream::Plain(p) => p,
                    // Never reached: STARTTLS is refused once TLS is up.
                    Stream::Tls(_) => return Ok(None),
                };
                let tls = acceptor.accept(plain).await?;
                conn = Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(tls)));
                state.tls_active = true;
                // Nothing negotiated in clear text carries over.
                state.session = Session::default();
            }
        }
    }
}

/// The negotiation state of one connection.
struct State<'a> {
    shared: &'a Arc<Shared>,
    fixed: bool,
    no_zeroes: bool,
    tls_active: bool,
    session: Session,
}

async fn send<S: AsyncWrite + Unpin>(conn: &mut S, bytes: &[u8]) -> io::Result<()> {
    conn.write_all(bytes).await?;
    conn.flush().await
}

async fn send_err<S: AsyncWrite + Unpin>(
    conn: &mut S,
    option: u32,
    reply_type: u32,
    message: &str,
) -> io::Result<()> {
    send(conn, &encode_error_reply(option, reply_type, Some(message))).await
}

/// Read and drop `len` bytes in bounded chunks.
async fn discard<S: AsyncRead + Unpin>(conn: &mut S, len: u32) -> io::Result<()> {
    let mut left = u64::from(len);
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let n = usize::try_from(left.min(64 * 1024)).unwrap_or(64 * 1024);
        let chunk = buf.get_mut(..n).unwrap_or_default();
        conn.read_exact(chunk).await?;
        left = left.saturating_sub(u64::try_from(n).unwrap_or(u64::MAX));
    }
    Ok(())
}

impl State<'_> {
    fn tls_required(&self) -> bool {
        self.shared.tls.is_some() && !self.tls_active
    }

    async fn one_option(&mut self, conn: &mut Stream) -> io::Result<Step> {
        let mut hdr = [0u8; consts::OPTION_HEADER_LEN];
        conn.read_exact(&mut hdr).await?;
        let header = match decode_option_header(&hdr) {
            Ok(h) => h,
            Err(e) => {
                self.shared.log(format_args!("negotiation: {e}"));
                return Ok(Step::Close);
            }
        };
        let code = header.code;
        if !self.fixed && code != consts::OPT_EXPORT_NAME {
            // Non-fixed newstyle: no way to send an error reply.
            return Ok(Step::Close);
        }
        if header.check_len().is_err() {
            if code == consts::OPT_EXPORT_NAME {
                return Ok(Step::Close);
            }
            discard(conn, header.length).await?;
            send_err(
                conn,
                code,
                consts::REP_ERR_TOO_BIG,
                "option payload too long",
            )
            .await?;
            return Ok(Step::Continue);
        }
        let len = usize::try_from(header.length).unwrap_or(0);
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload).await?;

        if self.tls_required() {
            return self.before_tls(conn, code, &payload).await;
        }

        let opt = match decode_option(code, &payload) {
            Ok(o) => o,
            Err(e) => {
                if code == consts::OPT_EXPORT_NAME {
                    return Ok(Step::Close);
                }
                send_err(conn, code, e.option_reply_type(), &e.to_string()).await?;
                return Ok(Step::Continue);
            }
        };
        self.handle(conn, code, opt).await
    }

    /// FORCEDTLS: only STARTTLS and ABORT before TLS is up.
    async fn before_tls(
        &mut self,
        conn: &mut Stream,
        code: u32,
        payload: &[u8],
    ) -> io::Result<Step> {
        match code {
            consts::OPT_STARTTLS => {
                if !payload.is_empty() {
                    send_err(
                        conn,
                        code,
                        consts::REP_ERR_INVALID,
                        "STARTTLS takes no payload",
                    )
                    .await?;
                    return Ok(Step::Continue);
                }
                send(conn, &handshake::encode_ack(code)).await?;
                Ok(Step::StartTls)
            }
            consts::OPT_ABORT => {
                let _ = send(conn, &handshake::encode_ack(code)).await;
                Ok(Step::Close)
            }
            consts::OPT_EXPORT_NAME => Ok(Step::Close),
            _ => {
                send_err(
                    conn,
                    code,
                    consts::REP_ERR_TLS_REQD,
                    "TLS is required: send NBD_OPT_STARTTLS first",
                )
                .await?;
                Ok(Step::Continue)
            }
        }
    }

    fn export_flags(&self) -> u16 {
        self.shared
            .export_flags(self.session.structured, self.session.extended)
    }

    async fn handle(
        &mut self,
        conn: &mut Stream,
        code: u32,
        opt: ClientOption,
    ) -> io::Result<Step> {
        let shared = self.shared;
        let cfg = &shared.config;
        match opt {
            ClientOption::ExportName(name) => {
                if name != cfg.export_name {
                    self.shared
                        .log(format_args!("export name '{name}' refused (unknown)"));
                    return Ok(Step::Close);
                }
                self.session.size = shared.size();
                let reply = handshake::encode_export_name_reply(
                    self.session.size,
                    self.export_flags(),
                    self.no_zeroes,
                );
                send(conn, &reply).await?;
                Ok(Step::Transmission)
            }
            ClientOption::Abort => {
                let _ = send(conn, &handshake::encode_ack(code)).await;
                Ok(Step::Close)
            }
            ClientOption::List => {
                let server = handshake::encode_server(&cfg.export_name)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                conn.write_all(&server).await?;
                send(conn, &handshake::encode_ack(code)).await?;
                Ok(Step::Continue)
            }
            ClientOption::StartTls => {
                let (t, msg) = if self.tls_active {
                    (consts::REP_ERR_INVALID, "TLS is already active")
                } else {
                    (
                        consts::REP_ERR_UNSUP,
                        "this server is not configured for TLS",
                    )
                };
                send_err(conn, code, t, msg).await?;
                Ok(Step::Continue)
            }
            ClientOption::Info {
                name,
                info_requests,
            }
            | ClientOption::Go {
                name,
                info_requests,
            } => self.info_or_go(conn, code, &name, &info_requests).await,
            ClientOption::StructuredReply => {
                let refusal = if !cfg.structured_replies {
                    Some((consts::REP_ERR_UNSUP, "structured replies are disabled"))
                } else if self.session.extended {
                    Some((
                        consts::REP_ERR_EXT_HEADER_REQD,
                        "extended headers are already negotiated",
                    ))
                } else if self.session.structured {
                    Some((
                        consts::REP_ERR_INVALID,
                        "structured replies are already negotiated",
                    ))
                } else {
                    None
                };
                match refusal {
                    Some((t, msg)) => send_err(conn, code, t, msg).await?,
                    None => {
                        self.session.structured = true;
                        send(conn, &handshake::encode_ack(code)).await?;
                    }
                }
                Ok(Step::Continue)
            }
            ClientOption::ExtendedHeaders => {
                if !cfg.extended_headers {
                    send_err(
                        conn,
                        code,
                        consts::REP_ERR_UNSUP,
                        "extended headers are disabled",
                    )
                    .await?;
                } else if self.session.extended {
                    send_err(
                        conn,
                        code,
                        consts::REP_ERR_INVALID,
                        "extended headers are already negotiated",
                    )
                    .await?;
                } else {
                    self.session.extended = true;
                    self.session.structured = true;
                    send(conn, &handshake::encode_ack(code)).await?;
                }
                Ok(Step::Continue)
            }
            ClientOption::ListMetaContext { export, queries } => {
                self.meta_context(conn, code, &export, &queries, false)
                    .await
            }
            ClientOption::SetMetaContext { export, queries } => {
                self.meta_context(conn, code, &export, &queries, true).await
            }
            ClientOption::Unknown(_) => {
                send_err(conn, code, consts::REP_ERR_UNSUP, "unknown option").await?;
                Ok(Step::Continue)
            }
        }
    }

    async fn info_or_go(
        &mut self,
        conn: &mut Stream,
        code: u32,
        name: &str,
        info_requests: &[u16],
    ) -> io::Result<Step> {
        let shared = self.shared;
        let cfg = &shared.config;
        if name != cfg.export_name {
            let msg = format!("export '{name}' not available");
            send_err(conn, code, consts::REP_ERR_UNKNOWN, &msg).await?;
            return Ok(Step::Continue);
        }
        let wants_block_size = info_requests.contains(&consts::INFO_BLOCK_SIZE);
        if code == consts::OPT_GO && cfg.min_block_size > 1 && !wants_block_size {
            send_err(
                conn,
                code,
                consts::REP_ERR_BLOCK_SIZE_REQD,
                "this export needs aligned requests: ask for NBD_INFO_BLOCK_SIZE",
            )
            .await?;
            return Ok(Step::Continue);
        }
        let mut out = Vec::with_capacity(128);
        self.session.size = shared.size();
        out.extend_from_slice(&handshake::encode_info_export(
            code,
            self.session.size,
            self.export_flags(),
        ));
        if info_requests.contains(&consts::INFO_NAME)
            && let Ok(b) = handshake::encode_info_name(code, &cfg.export_name)
        {
            out.extend_from_slice(&b);
        }
        out.extend_from_slice(&handshake::encode_info_block_size(
            code,
            cfg.min_block_size,
            cfg.preferred_block_size,
            shared.max_payload(),
        ));
        out.extend_from_slice(&handshake::encode_ack(code));
        send(conn, &out).await?;
        Ok(if code == consts::OPT_GO {
            Step::Transmission
        } else {
            Step::Continue
        })
    }

    async fn meta_context(
        &mut self,
        conn: &mut Stream,
        code: u32,
        export: &str,
        queries: &[String],
        set: bool,
    ) -> io::Result<Step> {
        if !self.session.structured {
            send_err(
                conn,
                code,
                consts::REP_ERR_INVALID,
                "negotiate structured replies first",
            )
            .await?;
            return Ok(Step::Continue);
        }
        if export != self.shared.config.export_name {
            let msg = format!("export '{export}' not available");
            send_err(conn, code, consts::REP_ERR_UNKNOWN, &msg).await?;
            return Ok(Step::Continue);
        }
        let (mut base, mut depth) = (false, false);
        if queries.is_empty() && !set {
            base = true;
            depth = true;
        }
        for q in queries {
            match q.as_str() {
                META_CONTEXT_BASE_ALLOCATION => base = true,
                META_CONTEXT_ALLOCATION_DEPTH => depth = true,
                // A bare namespace lists everything in it.
                "base:" if !set => base = true,
                "qemu:" if !set => depth = true,
                _ => {}
            }
        }
        let mut out = Vec::new();
        for (wanted, id, name) in [
            (base, META_ID_BASE_ALLOCATION, META_CONTEXT_BASE_ALLOCATION),
            (
                depth,
                META_ID_ALLOCATION_DEPTH,
                META_CONTEXT_ALLOCATION_DEPTH,
            ),
        ] {
            if wanted {
                let id = if set { id } else { 0 };
                let rep = handshake::encode_meta_context(code, id, name)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                out.extend_from_slice(&rep);
            }
        }
        if set {
            self.session.meta_base = base;
            self.session.meta_depth = depth;
        }
        out.extend_from_slice(&handshake::encode_ack(code));
        send(conn, &out).await?;
        Ok(Step::Continue)
    }
}
