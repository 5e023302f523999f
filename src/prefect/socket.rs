//! Opening one of Prefect's event websockets (`/events/out`, `/events/in`): the URL, the
//! `prefect` subprotocol, Basic auth on the upgrade when an auth string is set, and the in-band
//! `{"type":"auth"}` handshake. Shared by the subscriber, the emitter and the worker channel.

use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::client::ClientConfig;

/// An open, authenticated event websocket.
pub type EventSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why a websocket could not be opened or broke.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The websocket could not be opened or broke.
    #[error("events websocket: {0}")]
    Socket(#[from] tokio_tungstenite::tungstenite::Error),
    /// The server did not accept the handshake.
    #[error("events websocket handshake refused: {0}")]
    Handshake(String),
    /// The URL cannot be turned into a websocket URL.
    #[error("invalid events URL: {0}")]
    Url(String),
}

/// `http://h/api` → `ws://h/api/<path>` (`https` → `wss`).
///
/// # Errors
/// [`SocketError::Url`] for a scheme other than http(s).
pub fn ws_url(api_url: &url::Url, path: &str) -> Result<url::Url, SocketError> {
    let mut url = api_url.clone();
    let scheme = match url.scheme() {
        "http" => "ws",
        "https" => "wss",
        other => return Err(SocketError::Url(format!("unsupported scheme {other}"))),
    };
    url.set_scheme(scheme)
        .map_err(|()| SocketError::Url(crate::redact::url(api_url.as_str()).into_owned()))?;
    // Credentials are sent as headers, never as part of the URL (or its Host header).
    let _ = url.set_username("");
    let _ = url.set_password(None);
    let joined = format!("{}/{path}", url.path().trim_end_matches('/'));
    url.set_path(&joined);
    Ok(url)
}

/// `http://h/api` → `ws://h/api/events/out`.
///
/// # Errors
/// [`SocketError::Url`] for a scheme other than http(s).
pub fn events_out_url(api_url: &url::Url) -> Result<url::Url, SocketError> {
    ws_url(api_url, "events/out")
}

/// Opens `path` under the API and completes Prefect's auth handshake with `token`.
///
/// # Errors
/// [`SocketError`] when the socket cannot be opened or the server refuses the handshake.
pub async fn connect(
    config: &ClientConfig,
    path: &str,
    token: Option<String>,
) -> Result<EventSocket, SocketError> {
    open(config, path, Some(token)).await
}

/// Opens `path` the way Prefect 2 servers expect: no `prefect` subprotocol and no auth
/// message (Prefect 3 servers accept this too when no auth string is configured).
///
/// # Errors
/// [`SocketError`] when the socket cannot be opened.
pub async fn connect_legacy(config: &ClientConfig, path: &str) -> Result<EventSocket, SocketError> {
    open(config, path, None).await
}

/// Whether a failed handshake says the server does not speak the `prefect` subprotocol.
pub fn is_subprotocol_refusal(error: &SocketError) -> bool {
    let text = error.to_string().to_ascii_lowercase();
    text.contains("subprotocol")
}

/// The token of the in-band auth message: the auth string, else the API key.
pub fn auth_token(config: &ClientConfig) -> Option<String> {
    config
        .auth_string
        .clone()
        .filter(|s| !s.is_empty())
        .or_else(|| config.api_key.clone().filter(|s| !s.is_empty()))
}

/// Opens `path` with the `prefect` subprotocol and stops there: the caller sends the auth
/// message itself (the worker channel reads the server's refusal reasons).
///
/// # Errors
/// [`SocketError`] when the upgrade fails (the HTTP status is in [`SocketError::Socket`]).
pub async fn upgrade(config: &ClientConfig, path: &str) -> Result<EventSocket, SocketError> {
    upgrade_with(config, path, true).await
}

async fn upgrade_with(
    config: &ClientConfig,
    path: &str,
    subprotocol: bool,
) -> Result<EventSocket, SocketError> {
    let url = ws_url(&config.api_url, path)?;
    let mut request = url.as_str().into_client_request()?;
    let headers = request.headers_mut();
    if subprotocol {
        headers.insert(
            "Sec-WebSocket-Protocol",
            "prefect"
                .parse()
                .map_err(|_| SocketError::Url("header".into()))?,
        );
    }
    if let Some(auth) = config.auth_string.as_deref().filter(|s| !s.is_empty()) {
        let value = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(auth)
        );
        if let Ok(v) = value.parse() {
            headers.insert("Authorization", v);
        }
    }
    let (socket, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(request),
    )
    .await
    .map_err(|_| SocketError::Handshake("timed out connecting".into()))??;
    Ok(socket)
}

/// `auth`: `Some(token)` for Prefect 3's handshake, `None` for the legacy one.
async fn open(
    config: &ClientConfig,
    path: &str,
    auth: Option<Option<String>>,
) -> Result<EventSocket, SocketError> {
    let mut socket = upgrade_with(config, path, auth.is_some()).await?;
    let Some(token) = auth else {
        return Ok(socket);
    };
    socket
        .send(Message::text(
            json!({"type": "auth", "token": token}).to_string(),
        ))
        .await?;
    let reply = tokio::time::timeout(Duration::from_secs(10), socket.next())
        .await
        .map_err(|_| SocketError::Handshake("no answer to auth".into()))?;
    match reply {
        Some(Ok(Message::Text(text))) if text.contains("auth_success") => Ok(socket),
        other => Err(SocketError::Handshake(format!("{other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = events_out_url(&url::Url::parse("http://127.0.0.1:4200/api").unwrap()).unwrap();
        assert_eq!(u.as_str(), "ws://127.0.0.1:4200/api/events/out");
        let u = ws_url(&url::Url::parse("https://x/api/").unwrap(), "events/in").unwrap();
        assert_eq!(u.as_str(), "wss://x/api/events/in");
        assert!(ws_url(&url::Url::parse("ftp://x/api").unwrap(), "events/in").is_err());
    }
}
