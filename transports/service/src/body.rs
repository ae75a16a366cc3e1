//! The one response body type of every route.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use switchboard_sse::SseBody;

/// The body of every Switchboard response: a whole answer (JSON, the
/// browser client, metrics), nothing (a WebSocket upgrade), or an SSE stream
/// that lasts as long as its session.
#[derive(Debug)]
pub struct ResponseBody {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Full(Option<Bytes>),
    Sse(SseBody),
}

impl ResponseBody {
    /// A whole answer.
    #[must_use]
    pub fn full(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
        }
    }

    /// No body.
    #[must_use]
    pub fn empty() -> Self {
        Self {
            kind: Kind::Full(None),
        }
    }

    /// An SSE stream.
    #[must_use]
    pub fn sse(body: SseBody) -> Self {
        Self {
            kind: Kind::Sse(body),
        }
    }

    /// Whether this is a stream that ends only with its session (frameworks
    /// that must not buffer it can tell).
    #[must_use]
    pub fn is_stream(&self) -> bool {
        matches!(self.kind, Kind::Sse(_))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut self.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Sse(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.kind, Kind::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Sse(_) => SizeHint::default(),
        }
    }
}
