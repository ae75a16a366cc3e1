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
//! `[]`). Between polls the session is detached; the core closes it after the
//! session idle time without a poll, and this transport then frees it. Every
//! request is authenticated again, and a sid only works for the identity that
//! opened it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use switchboard_core::{ErrorCode, Liveness};
use switchboard_runtime::http_api;
use switchboard_runtime::{query_param, Drained, OutFrame, Session, Switchboard};
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
    /// since. A tokio Mutex: a poll holds it while it waits for frames.
    pending: tokio::sync::Mutex<Vec<Arc<OutFrame>>>,
    /// Cancels the poll in progress when a newer one arrives.
    current: Mutex<CancellationToken>,
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
        let _ = session.outbox().try_recv(&mut welcome);
        session.detach();
        let poll = Arc::new(PollSession {
            session,
            pending: tokio::sync::Mutex::new(welcome.clone()),
            current: Mutex::new(CancellationToken::new()),
        });
        self.lock().insert(sid.clone(), Arc::clone(&poll));
        self.reap_when_ended(sid, &poll);
        answer(&welcome)
    }

    /// Frees a session once the core has ended it, after one more poll
    /// timeout so the client can still fetch its `close` frame.
    fn reap_when_ended(&self, sid: String, poll: &Arc<PollSession>) {
        let poll = Arc::clone(poll);
        let sessions = Arc::clone(&self.sessions);
        let grace = self.switchboard.runtime_config().poll_timeout;
        self.switchboard.tasks().spawn(async move {
            poll.session.outbox().ended().await;
            drop(poll);
            tokio::time::sleep(grace).await;
            sessions
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&sid);
        });
    }

    /// `GET …/poll?sid=…&ack=n`.
    pub async fn poll<B>(&self, request: Request<B>) -> Response<Bytes> {
        let (parts, _body) = request.into_parts();
        // Authenticated again on every poll, but the sid is looked up among
        // this transport's sessions, not in the core (`http_api::session_of`):
        // a session the core has just closed (idle, heartbeat_timeout,
        // too_many_errors) is already gone from the core while its `close`
        // frame still waits here for the client. Looking it up in the core
        // answered that poll 403 and the client never learned why it was closed.
        let identity = match self.switchboard.admit(&parts).await {
            Ok(identity) => identity,
            Err(refusal) => {
                return http_api::error(refusal.http_status(), refusal.code, &refusal.message)
            }
        };
        let query = parts.uri.query().unwrap_or("");
        let Some(sid) = query_param(query, "sid") else {
            return http_api::error(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidFrame,
                "missing `sid`",
            );
        };
        let Some(poll) = self
            .lock()
            .get(&sid)
            .cloned()
            .filter(|p| p.session.identity().user.as_str() == identity.user.as_str())
        else {
            return http_api::error(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                "no session of yours with that sid",
            );
        };
        let ack: usize = query_param(query, "ack")
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
        let acked = ack.min(pending.len());
        pending.drain(..acked);
        if pending.is_empty() && poll.session.outbox().is_ended() {
            let _: Option<Drained> = poll.session.outbox().try_recv(&mut pending);
            if pending.is_empty() {
                // The client has acknowledged the `close` frame: the session
                // is over, and further polls are refused like unknown sids
                // (rather than answered `[]` at once, over and over).
                drop(pending);
                self.lock().remove(&sid);
                return http_api::error(
                    StatusCode::FORBIDDEN,
                    ErrorCode::Forbidden,
                    "no session of yours with that sid",
                );
            }
        }
        let attached = Attached::new(&poll.session);
        let timeout = self.switchboard.runtime_config().poll_timeout;
        if pending.is_empty() {
            tokio::select! {
                _ = poll.session.outbox().recv(&mut pending) => {}
                () = tokio::time::sleep(timeout) => {}
                () = mine.cancelled() => return answer(&[]),
            }
        }
        // Frames that arrived meanwhile go out in the same answer.
        let _: Option<Drained> = poll.session.outbox().try_recv(&mut pending);
        drop(attached);
        let response = answer(&pending);
        poll.session.count_written(response.body().len());
        response
    }

    /// `POST …/poll/send?sid=…`.
    pub async fn send<B>(&self, request: Request<B>) -> Response<Bytes>
    where
        B: Body,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        http_api::send(&self.switchboard, request).await
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
