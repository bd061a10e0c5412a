//! The `/metrics` HTTP endpoint (hyper 1, HTTP/1.1 only). Every other path is
//! 404, other methods than GET and HEAD 405. Each connection is its own task;
//! shutdown stops accepting and lets in-flight scrapes finish on their own.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::CONTENT_TYPE,
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::{
    counting::state::SharedState,
    metrics::exposition::{render_as, Format},
    serving::shutdown::Shutdown,
};

const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("binding the metrics listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds `addr`; the returned listener is served by [`serve`]. Binding first
/// lets start-up fail on a taken port instead of a task logging it later.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    if !addr.ip().is_loopback() {
        log::warn!("metrics are served on {addr}, which is not a loopback address: anyone who can reach it can read them");
    }
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

fn respond(request: &Request<Incoming>, state: &SharedState) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    if request.uri().path() != "/metrics" {
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        return response;
    }
    // The scrape reads locks the query path also takes: off the async
    // workers' hot loop it would be no faster, and it is short (see
    // exposition's opening comment), so it runs inline.
    let format = Format::from_accept(
        request
            .headers()
            .get(hyper::header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    *response.body_mut() = Full::new(Bytes::from(render_as(state, format)));
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(format.content_type()),
    );
    response
}

/// Answers scrapes on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, state: Arc<SharedState>, mut shutdown: Shutdown) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and the like pass; keep serving rather than stop.
                log::warn!("metrics listener: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let response = respond(&request, &state);
                async move { Ok::<_, Infallible>(response) }
            });
            // A client that never finishes its request head is dropped, so
            // idle connections cannot pile up.
            if let Err(e) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                log::debug!("metrics connection: {e}");
            }
        });
    }
}
