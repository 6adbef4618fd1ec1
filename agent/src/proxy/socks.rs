//! SOCKS5 front end: handshake, CONNECT through the dialer, then a raw relay.

use std::net::SocketAddr;
use std::pin::pin;

use futures_io::{AsyncRead, AsyncWrite};
use futures_lite::AsyncWriteExt;

use super::io::{linger_close, relay_stream, timeout, Inbound, Source};
use super::socks5::{self, reply, Socks5Error};
use super::{dial, DialError, Dialer, ProxyConfig};
use crate::error::{Error, Result};

type ParseFn<T> = fn(&[u8]) -> Result<Option<(T, usize)>, Socks5Error>;

/// Reads one message; `Err(None)` means the client went away mid-handshake.
async fn read_msg<R: AsyncRead + Unpin, T>(
    inb: &mut Inbound<R>,
    parse: ParseFn<T>,
) -> Result<T, Option<Socks5Error>> {
    loop {
        match parse(inb.buffered()) {
            Ok(Some((msg, len))) => {
                inb.consume(len);
                return Ok(msg);
            }
            Ok(None) => match inb.fill().await {
                Ok(0) | Err(_) => return Err(None),
                Ok(_) => {}
            },
            Err(e) => return Err(Some(e)),
        }
    }
}

/// What the handshake ended with.
enum Handshake {
    /// The client asked to connect here.
    Connect(fluidity_proto::Target),
    /// The client was answered and must be disconnected; the text is for the log.
    Rejected(String),
}

async fn handshake<R, W>(inb: &mut Inbound<R>, w: &mut W, cfg: &ProxyConfig) -> Result<Handshake>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let greeting = match read_msg(inb, socks5::parse_greeting).await {
        Ok(g) => g,
        Err(e) => return Ok(Handshake::Rejected(describe(e))),
    };
    let method = if cfg.auth.is_some() {
        greeting
            .offers(socks5::METHOD_USER_PASS)
            .then_some(socks5::METHOD_USER_PASS)
    } else if greeting.offers(socks5::METHOD_NO_AUTH) {
        Some(socks5::METHOD_NO_AUTH)
    } else {
        // No credentials are configured, but a client that only offers username/password
        // still gets through: it is accepted whatever it sends.
        greeting
            .offers(socks5::METHOD_USER_PASS)
            .then_some(socks5::METHOD_USER_PASS)
    };
    let Some(method) = method else {
        w.write_all(&[socks5::VERSION, socks5::METHOD_NONE_ACCEPTABLE])
            .await?;
        w.flush().await?;
        let why = if cfg.auth.is_some() {
            "the client does not offer username/password authentication, which this proxy \
             requires"
        } else {
            "the client offers neither no authentication nor username/password"
        };
        return Ok(Handshake::Rejected(format!(
            "no acceptable authentication method: {why}"
        )));
    };
    w.write_all(&[socks5::VERSION, method]).await?;
    w.flush().await?;

    if method == socks5::METHOD_USER_PASS {
        let up = match read_msg(inb, socks5::parse_user_pass).await {
            Ok(up) => up,
            Err(e) => return Ok(Handshake::Rejected(describe(e))),
        };
        let ok = cfg
            .auth
            .as_ref()
            .is_none_or(|c| c.matches(&up.username, &up.password));
        w.write_all(&[1, if ok { 0 } else { 1 }]).await?;
        w.flush().await?;
        if !ok {
            return Ok(Handshake::Rejected("wrong username or password".into()));
        }
    }

    let request = match read_msg(inb, socks5::parse_request).await {
        Ok(r) => r,
        Err(Some(Socks5Error::AddressType(t))) => {
            w.write_all(&socks5::reply(reply::ADDRESS_TYPE_NOT_SUPPORTED))
                .await?;
            return Ok(Handshake::Rejected(format!("unsupported address type {t}")));
        }
        Err(e @ Some(Socks5Error::Reserved | Socks5Error::EmptyDomain)) => {
            w.write_all(&socks5::reply(reply::GENERAL_FAILURE)).await?;
            return Ok(Handshake::Rejected(describe(e)));
        }
        Err(e) => return Ok(Handshake::Rejected(describe(e))),
    };
    if request.command != socks5::CMD_CONNECT {
        w.write_all(&socks5::reply(reply::COMMAND_NOT_SUPPORTED))
            .await?;
        return Ok(Handshake::Rejected(format!(
            "command {} is not supported (only CONNECT)",
            request.command
        )));
    }
    match request.target() {
        Some(t) => Ok(Handshake::Connect(t)),
        None => {
            w.write_all(&socks5::reply(reply::HOST_UNREACHABLE)).await?;
            let why = if request.port == 0 {
                "port 0 is not a destination".to_string()
            } else {
                "invalid host name".to_string()
            };
            Ok(Handshake::Rejected(why))
        }
    }
}

fn describe(e: Option<Socks5Error>) -> String {
    match e {
        Some(e) => e.to_string(),
        None => "client closed the connection during the handshake".into(),
    }
}

/// Answers a SOCKS4 or SOCKS4a request with SOCKS4's own refusal. Only SOCKS5 is served:
/// SOCKS4 carries no password, so it could not meet the proxy's credentials.
pub(super) async fn refuse_socks4<R, W>(
    inb: &mut Inbound<R>,
    w: &mut W,
    peer: SocketAddr,
) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    const WHY: &str = "SOCKS4 is not supported; configure the client for SOCKS5 \
                       (for example curl --socks5-hostname)";
    tracing::info!(%peer, proto = "socks4", error = WHY, "request rejected");
    w.write_all(&socks5::SOCKS4_REJECTED).await?;
    w.flush().await?;
    // The rest of the request may still be on its way: read it, so that closing does not
    // reset the connection before the client has read the refusal.
    linger_close(inb, w).await;
    Err(Error::ClientProtocol(WHY.into()))
}

/// Serves a SOCKS5 client whose first byte is buffered in `inb`.
pub(super) async fn serve<D, R, W>(
    inb: &mut Inbound<R>,
    w: &mut W,
    peer: SocketAddr,
    dialer: &D,
    cfg: &ProxyConfig,
) -> Result<()>
where
    D: Dialer,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let target = timeout(cfg.head_timeout, pin!(handshake(inb, w, cfg))).await;
    let target = match target {
        None => return Err(Error::ClientTimeout(cfg.head_timeout)),
        Some(Err(e)) => return Err(e),
        Some(Ok(Handshake::Rejected(why))) => {
            let _ = w.flush().await;
            tracing::info!(%peer, proto = "socks5", error = %why, "request rejected");
            // As for SOCKS4: what the client sent behind its request is read, so that the
            // close does not reset the connection before it has read the refusal.
            linger_close(inb, w).await;
            return Err(Error::ClientProtocol(why));
        }
        Some(Ok(Handshake::Connect(t))) => t,
    };
    let stream = match dial(dialer, &target, cfg, inb).await {
        Ok(Ok(s)) => s,
        Err(left) => {
            tracing::debug!(%peer, proto = "socks5", %target, how = left.0, "client gone before its stream opened");
            return Err(Error::Aborted(format!("SOCKS5 to {target}: {}", left.0)));
        }
        Ok(Err(e)) => {
            let code = match &e {
                DialError::Refused(r) => socks5::reply_for_refusal(r.reason),
                DialError::TunnelDown(_) | DialError::TunnelUnusable(_) | DialError::Stopping => {
                    reply::GENERAL_FAILURE
                }
                DialError::NoStream(_) => reply::TTL_EXPIRED,
            };
            tracing::info!(%peer, proto = "socks5", %target, reply = code, error = %e, "connect refused");
            w.write_all(&socks5::reply(code)).await?;
            w.flush().await?;
            linger_close(inb, w).await;
            return Ok(());
        }
    };
    w.write_all(&socks5::reply(reply::SUCCEEDED)).await?;
    w.flush().await?;
    let result = relay_stream(inb, w, stream).await;
    match result {
        Ok((up, down)) => {
            tracing::debug!(%peer, proto = "socks5", %target, up, down, "tunnel closed");
            Ok(())
        }
        Err(e) => {
            if e.is_routine() {
                tracing::debug!(%peer, proto = "socks5", %target, error = %e, "tunnel aborted");
            } else {
                tracing::info!(%peer, proto = "socks5", %target, error = %e, "tunnel aborted");
            }
            Err(Error::Aborted(format!("SOCKS5 to {target}: {e}")))
        }
    }
}
