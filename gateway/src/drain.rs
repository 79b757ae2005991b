//! Refused requests still reach their client.
//!
//! A handler that refuses a request before reading its body (a missing
//! token, a wrong content type, a declared size over the limit) drops the
//! body unread. hyper then closes the connection with the client's bytes
//! still unread, and the kernel answers them with a reset: a client that
//! writes its whole body before reading (Python's httpx, browsers on some
//! paths) sees "connection reset" instead of the 4xx JSON. Clients that read
//! while they send (curl, reqwest) happen to see the answer first.
//!
//! [`unread_bodies`] wraps every request body so that dropping it unread
//! hands the rest to a task that reads and discards it, bounded by
//! [`DRAIN_MAX_BYTES`] and [`DRAIN_MAX_TIME`], while hyper writes the
//! answer. A client that asked for `Expect: 100-continue` has sent no body
//! yet and gets none drained: it reads the early answer instead of sending.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::Request,
    http::header,
    middleware::Next,
    response::Response,
};
use futures::StreamExt as _;
use http_body::{Frame, SizeHint};

/// Most bytes of a refused body read and discarded: above the 20 MB upload
/// limit with room for a client that sent a few times more. A larger body
/// is cut off (its client may then see a reset).
pub const DRAIN_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Longest time spent reading a refused body.
pub const DRAIN_MAX_TIME: Duration = Duration::from_secs(30);

/// Middleware: the request's body, drained if dropped unread.
pub async fn unread_bodies(request: Request, next: Next) -> Response {
    let expects_continue = request
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let body = Body::new(DrainOnDrop { inner: Some(body) });
    next.run(Request::from_parts(parts, body)).await
}

/// A body that, dropped before its end, drains the rest in the background.
struct DrainOnDrop {
    /// `None` once the body ended (nothing left to drain).
    inner: Option<Body>,
}

impl http_body::Body for DrainOnDrop {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        // Ended or broken: there is nothing left to drain.
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            this.inner = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), http_body::Body::size_hint)
    }
}

impl Drop for DrainOnDrop {
    fn drop(&mut self) {
        let Some(body) = self.inner.take() else {
            return;
        };
        if http_body::Body::is_end_stream(&body) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(drain(body));
        }
    }
}

async fn drain(body: Body) {
    let mut frames = body.into_data_stream();
    let mut read: u64 = 0;
    let outcome = tokio::time::timeout(DRAIN_MAX_TIME, async {
        while let Some(Ok(chunk)) = frames.next().await {
            read += chunk.len() as u64;
            if read > DRAIN_MAX_BYTES {
                return false;
            }
        }
        true
    })
    .await;
    match outcome {
        Ok(true) => tracing::debug!(bytes = read, "Drained a refused request body."),
        Ok(false) => tracing::info!(
            bytes = read,
            "A refused request body is larger than the drain limit; closing the connection."
        ),
        Err(_) => tracing::info!(
            bytes = read,
            "A refused request body was still arriving after the drain time; closing the connection."
        ),
    }
}
