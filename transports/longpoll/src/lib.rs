//! Switchboard over HTTP long-poll, written against the `http` crate's types.
//!
//! - `POST …/poll/open` opens a session and answers `[welcome]`.
//! - `GET …/poll?sid=…&ack=n` answers the JSON array of frames queued for the
//!   session, waiting up to the poll timeout when there are none. `ack` is how
//!   many frames of the previous answer the client received: the rest are
//!   sent again, so an answer lost in transit loses nothing.
//! - `POST …/poll/send?sid=…` takes one client frame or an array.
//!
//! A second poll on the same sid ends the first one cleanly (it answers
//! `[]`). A poll arriving is the session's proof of life: between polls the
//! session is detached, and the core closes it `idle` after the session idle
//! time without a poll (never `heartbeat_timeout`); this transport then frees
//! it. Every request is authenticated again, and a sid only works for the
//! identity that opened it, and only on this transport's endpoints (not an
//! SSE or WebSocket session's sid).
//!
//! What the client has not acknowledged counts against the session's
//! outbound bound (`RuntimeConfig::max_outbound_bytes`) together with what is
//! queued: a client that never acknowledges is closed as `slow_consumer`,
//! like a stalled reader on the other transports, and its next poll answers
//! `[close]`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use switchboard_core::{ErrorCode, FrameKind, Liveness};
use switchboard_runtime::http_api;
use switchboard_runtime::{query_param, OutFrame, Session, Switchboard};
use tokio_util::sync::CancellationToken;

/// The long-poll transport: holds the sessions between polls.
#[derive(Clone)]
pub struct LongPoll {
    switchboard: Switchboard,
    sessions: Arc<Mutex<HashMap<String, Arc<PollSession>>>>,
}

impl std::fmt::Debug for LongPoll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LongPoll").finish_non_exhaustive()
    }
}

struct PollSession {
    session: Session,
    /// Frames of the last answer not yet acknowledged, then frames drained
    /// since. Taken from the outbox "held", so their bytes count against the
    /// outbound bound until acknowledged. A tokio Mutex: a poll holds it
    /// while it waits for frames.
    pending: tokio::sync::Mutex<Vec<Arc<OutFrame>>>,
    /// Cancels the poll in progress when a newer one arrives.
    current: Mutex<CancellationToken>,
    /// Cancelled once an answer carried the session's `close` frame.
    close_sent: CancellationToken,
}

impl PollSession {
    /// Drops the acknowledged frames of the last answer, and, once the
    /// session overflowed, every frame but its `close`.
    fn acknowledge(&self, pending: &mut Vec<Arc<OutFrame>>, ack: usize) {
        let outbox = self.session.outbox();
        let acked = ack.min(pending.len());
        let bytes = pending.drain(..acked).map(|f| f.bytes.len()).sum();
        outbox.release(bytes);
        if outbox.overflowed() {
            // Closed as slow_consumer: what was not delivered is dropped (the
            // client recovers with `since`), only the `close` remains.
            pending.retain(|f| f.kind == FrameKind::Close);
        }
    }
}

impl LongPoll {
    /// A long-poll transport for `switchboard`.
    #[must_use]
    pub fn new(switchboard: Switchboard) -> Self {
        Self {
            switchboard,
            sessions: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Sessions held between polls (for tests and metrics).
    #[must_use]
    pub fn session_count(&self) -> usize {
        self.lock().len()
    }

    // A std Mutex: only map lookups happen under it, nothing awaits.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<PollSession>>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `POST …/poll/open`: admits the client and answers `[welcome]`.
    pub async fn open<B>(&self, request: Request<B>) -> Response<Bytes> {
        if request.method() != Method::POST {
            return http_api::error(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::InvalidFrame,
                "use POST",
            );
        }
        let (parts, _body) = request.into_parts();
        let identity = match self.switchboard.admit(&parts).await {
            Ok(identity) => identity,
            Err(refusal) => {
                return http_api::error(refusal.http_status(), refusal.code, &refusal.message)
            }
        };
        let session = match self.switchboard.open(identity, Liveness::Client) {
            Ok(session) => session,
            Err(refusal) => {
                return http_api::error(refusal.http_status(), refusal.code, &refusal.message)
            }
        };
        let sid = session.sid().as_str().to_owned();
        let mut welcome = Vec::new();
        let _ = session.outbox().try_recv_held(&mut welcome);
        session.detach();
        let poll = Arc::new(PollSession {
            session,
            pending: tokio::sync::Mutex::new(welcome.clone()),
            current: Mutex::new(CancellationToken::new()),
            close_sent: CancellationToken::new(),
        });
        self.lock().insert(sid.clone(), Arc::clone(&poll));
        self.reap_when_ended(sid, &poll);
        answer(&welcome)
    }

    /// Frees a session once the core has ended it, after one more poll
    /// timeout so the client can still fetch its `close` frame (and fetch it
    /// again if that answer was lost). During shutdown the session is freed
    /// as soon as an answer carried its `close`: the task runs on the
    /// Switchboard's tracker, so [`Switchboard::shutdown`] waits for long-poll
    /// clients to fetch their `close` (up to its `shutdown_timeout`) but not
    /// for the rest of the grace period.
    fn reap_when_ended(&self, sid: String, poll: &Arc<PollSession>) {
        let poll = Arc::clone(poll);
        let sessions = Arc::clone(&self.sessions);
        let grace = self.switchboard.runtime_config().poll_timeout;
        let shutdown = self.switchboard.shutdown_token();
        self.switchboard.tasks().spawn(async move {
            poll.session.outbox().ended().await;
            let close_sent = poll.close_sent.clone();
            drop(poll);
            tokio::select! {
                () = tokio::time::sleep(grace) => {}
                () = async {
                    close_sent.cancelled().await;
                    shutdown.cancelled().await;
                } => {}
            }
            sessions
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&sid);
        });
    }

    /// This transport's session with `sid`, if it belongs to `user`.
    fn find(&self, sid: &str, user: &str) -> Option<Arc<PollSession>> {
        self.lock()
            .get(sid)
            .filter(|p| p.session.identity().user.as_str() == user)
            .cloned()
    }

    /// `GET …/poll?sid=…&ack=n`.
    pub async fn poll<B>(&self, request: Request<B>) -> Response<Bytes> {
        let (parts, _body) = request.into_parts();
        // Authenticated again on every poll (`identify`, not `admit`: during
        // shutdown a session must still fetch its `close`), and the sid is
        // looked up among this transport's sessions, not in the core: a
        // session the core has just closed (idle, too_many_errors, shutdown)
        // is already gone from the core while its `close` frame still waits
        // here for the client.
        let identity = match self.switchboard.identify(&parts).await {
            Ok(identity) => identity,
            Err(refusal) => {
                return http_api::error(refusal.http_status(), refusal.code, &refusal.message)
            }
        };
        let sid = match http_api::sid_param(&parts) {
            Ok(sid) => sid,
            Err(response) => return response,
        };
        let Some(poll) = self.find(&sid, identity.user.as_str()) else {
            return http_api::no_such_session();
        };
        let ack: usize = query_param(parts.uri.query().unwrap_or(""), "ack")
            .and_then(|a| a.parse().ok())
            .unwrap_or(0);

        // End the poll in progress, if any, and become the current one.
        let mine = CancellationToken::new();
        std::mem::replace(
            &mut *poll.current.lock().unwrap_or_else(PoisonError::into_inner),
            mine.clone(),
        )
        .cancel();
        let mut pending = poll.pending.lock().await;
        if mine.is_cancelled() {
            return answer(&[]); // an even newer poll arrived while this one queued
        }
        let outbox = poll.session.outbox();
        poll.acknowledge(&mut pending, ack);
        if pending.is_empty() && outbox.is_ended() {
            let _ = outbox.try_recv_held(&mut pending);
            poll.acknowledge(&mut pending, 0);
            if pending.is_empty() {
                // The client has acknowledged the `close` frame: the session
                // is over, and further polls are refused like unknown sids
                // (rather than answered `[]` at once, over and over).
                drop(pending);
                self.lock().remove(&sid);
                return http_api::no_such_session();
            }
        }
        let attached = Attached::new(&poll.session);
        let timeout = self.switchboard.runtime_config().poll_timeout;
        if pending.is_empty() {
            tokio::select! {
                _ = outbox.recv_held(&mut pending) => {}
                () = tokio::time::sleep(timeout) => {}
                () = mine.cancelled() => return answer(&[]),
            }
        }
        // Frames that arrived meanwhile go out in the same answer.
        let _ = outbox.try_recv_held(&mut pending);
        poll.acknowledge(&mut pending, 0);
        drop(attached);
        let response = answer(&pending);
        if pending.last().is_some_and(|f| f.kind == FrameKind::Close) {
            poll.close_sent.cancel();
        }
        poll.session.count_written(response.body().len());
        response
    }

    /// `POST …/poll/send?sid=…`: applies the body's frames to this
    /// transport's session `sid` (see [`http_api::apply_frames`]). A sid of
    /// another transport's session is refused like an unknown one.
    pub async fn send<B>(&self, request: Request<B>) -> Response<Bytes>
    where
        B: Body,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let http_api::ClientPost {
            identity,
            sid,
            body,
            ..
        } = match http_api::client_post(&self.switchboard, request).await {
            Ok(post) => post,
            Err(response) => return response,
        };
        match self.find(&sid, identity.user.as_str()) {
            Some(poll) if !poll.session.outbox().is_ended() => {
                http_api::apply_frames(&poll.session, body).await
            }
            _ => http_api::no_such_session(),
        }
    }
}

/// Marks a session attached while a poll waits, and detached when the poll
/// ends however it ends (answered, superseded, or dropped by a client that
/// went away), so the idle timer always starts.
struct Attached<'a>(&'a Session);

impl<'a> Attached<'a> {
    fn new(session: &'a Session) -> Self {
        session.attach();
        Self(session)
    }
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        self.0.detach();
    }
}

/// Frames as one JSON array, written from their encoded bytes.
fn answer(frames: &[Arc<OutFrame>]) -> Response<Bytes> {
    let mut body =
        BytesMut::with_capacity(2 + frames.iter().map(|f| f.bytes.len() + 1).sum::<usize>());
    body.put_u8(b'[');
    for (i, frame) in frames.iter().enumerate() {
        if i > 0 {
            body.put_u8(b',');
        }
        body.put_slice(&frame.bytes);
    }
    body.put_u8(b']');
    let mut response = Response::new(body.freeze());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
