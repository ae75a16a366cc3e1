//! A hardened HTTP/1 server loop: what faces the network directly.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves a tower service over HTTP/1.1 (with upgrades, for WebSocket) on a
/// TCP listener, cutting the two cheap attacks on a server that faces the
/// network:
///
/// - **Slow headers.** A client that sends its request headers slowly, or
///   opens TCP and sends nothing, is cut after
///   [`header_read_timeout`](Self::header_read_timeout) (default 10 s). The
///   clock runs whenever the connection waits for a request head, so an idle
///   kept-alive connection is closed after it too (browsers reconnect).
/// - **Connection floods.** Connections that have not yet sent their first
///   request head are bounded by
///   [`max_pending_connections`](Self::max_pending_connections) (default
///   1,024). When one more arrives, the *oldest* of them is dropped, not the
///   newcomer: a real client sends its headers within milliseconds of
///   connecting, so it is never the oldest, while an attacker's idle sockets
///   age in the queue. 10,000 idle sockets therefore cost the server at most
///   1,024 of them and never lock real clients out. Connections that sent a
///   request (WebSocket sessions, SSE streams, long-polls) are not counted.
///
/// Accepted sockets get `TCP_NODELAY`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Server {
    /// How long a connection may take to send a request's headers.
    pub header_read_timeout: Duration,
    /// How many connections may be open without having sent a request.
    pub max_pending_connections: usize,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_pending_connections: 1024,
        }
    }
}

impl Server {
    /// Sets [`Server::header_read_timeout`].
    #[must_use]
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// Sets [`Server::max_pending_connections`] (at least 1).
    #[must_use]
    pub fn max_pending_connections(mut self, max: usize) -> Self {
        self.max_pending_connections = max.max(1);
        self
    }

    /// Serves `service` on `listener` until `shutdown` completes, then stops
    /// accepting, lets every connection finish what it is answering
    /// (kept-alive idle ones close at once) and returns when all have ended.
    /// Bound that wait with a timeout of your own: an SSE stream lasts until
    /// its session ends, so shut the Switchboard down first.
    pub async fn serve<S, B>(
        &self,
        listener: TcpListener,
        service: S,
        shutdown: impl Future<Output = ()>,
    ) where
        S: tower_service::Service<Request<Incoming>, Response = Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let pending = Arc::new(Pending::new(self.max_pending_connections));
        let stop = CancellationToken::new();
        let connections = TaskTracker::new();
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = &mut shutdown => break,
            };
            let stream = match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly
                    // rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let ticket = pending.admit();
            let evicted = ticket.evicted.clone();
            let ticket = Arc::new(Mutex::new(Some(ticket)));
            let service = FirstRequest {
                inner: service.clone(),
                ticket: ticket.clone(),
            };
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(self.header_read_timeout);
            let stop = stop.clone();
            connections.spawn(async move {
                let connection = http
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                    .with_upgrades();
                tokio::pin!(connection);
                let result = tokio::select! {
                    result = connection.as_mut() => result,
                    () = evicted.cancelled() => {
                        tracing::debug!("dropped a connection that sent no request (too many pending)");
                        return;
                    }
                    () = stop.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(error = %e, "http connection ended");
                }
                drop(ticket);
            });
        }
        drop(listener);
        stop.cancel();
        connections.close();
        connections.wait().await;
    }
}

/// The connections that have sent no request yet, oldest first.
struct Pending {
    max: usize,
    // A std Mutex: held only to insert, remove or pop, never across an await.
    state: Mutex<PendingState>,
}

struct PendingState {
    next_id: u64,
    waiting: BTreeMap<u64, CancellationToken>,
}

impl Pending {
    fn new(max: usize) -> Self {
        Self {
            max,
            state: Mutex::new(PendingState {
                next_id: 0,
                waiting: BTreeMap::new(),
            }),
        }
    }

    /// Counts a new connection in, evicting the oldest beyond the bound.
    fn admit(self: &Arc<Self>) -> Ticket {
        let evicted = CancellationToken::new();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let id = state.next_id;
        state.next_id += 1;
        state.waiting.insert(id, evicted.clone());
        while state.waiting.len() > self.max {
            if let Some((_, oldest)) = state.waiting.pop_first() {
                oldest.cancel();
            }
        }
        Ticket {
            id,
            evicted,
            pending: self.clone(),
        }
    }
}

/// A connection's place in [`Pending`], given up when it sends its first
/// request or ends.
struct Ticket {
    id: u64,
    evicted: CancellationToken,
    pending: Arc<Pending>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.pending
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .waiting
            .remove(&self.id);
    }
}

/// The application's service, which gives up the connection's [`Ticket`]
/// when the first request head has arrived.
#[derive(Clone)]
struct FirstRequest<S> {
    inner: S,
    ticket: Arc<Mutex<Option<Ticket>>>,
}

impl<S, R> tower_service::Service<R> for FirstRequest<S>
where
    S: tower_service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        drop(
            self.ticket
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_pending_connection_is_evicted_first() {
        let pending = Arc::new(Pending::new(2));
        let first = pending.admit();
        let second = pending.admit();
        assert!(!first.evicted.is_cancelled());
        let third = pending.admit();
        assert!(first.evicted.is_cancelled());
        assert!(!second.evicted.is_cancelled());
        drop(second); // sent its request: no longer counted
        let fourth = pending.admit();
        assert!(!third.evicted.is_cancelled());
        assert!(!fourth.evicted.is_cancelled());
    }
}
