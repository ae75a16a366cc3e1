//! Credentials that expire, and their in-band refresh.
//!
//! A session's [`Identity::expires_at`] is a deadline in the session's own
//! timer entry: at that time the hub closes it with `token_expired` (1008).
//! A `refresh` frame carries a new credential, which the core cannot check
//! (checking may need I/O: the application's authenticator is async), so
//! the hub hands it out as [`Output::Refresh`] and the caller reports the
//! identity it names with [`Hub::complete_refresh`]. Only the same user may
//! take over a session: another user's credential, or one already expired,
//! is refused with `forbidden`, and the session keeps its old identity and
//! deadline.

use serde_json::value::RawValue;

use crate::codec::ServerFrame;
use crate::error::{ErrorCode, FrameError};
use crate::hub::Hub;
use crate::ids::SessionKey;
use crate::output::{FrameKind, Output, Recipients};
use crate::policy::Identity;
use crate::time::Timestamp;

/// A `refresh` frame waiting for the caller's authenticator: check
/// [`Refresh::token`], then call [`Hub::complete_refresh`] with it.
#[derive(Clone)]
pub struct Refresh {
    session: SessionKey,
    token: String,
    id: Option<Box<RawValue>>,
}

impl Refresh {
    /// The session that sent it.
    #[must_use]
    pub fn session(&self) -> SessionKey {
        self.session
    }

    /// The new credential, as the client sent it.
    #[must_use]
    pub fn token(&self) -> &str {
        &self.token
    }
}

/// Leaves the credential out, so that logging an output leaks no token.
impl std::fmt::Debug for Refresh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refresh")
            .field("session", &self.session)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// A decoded `refresh`: out to the caller, answered when it completes.
    pub(crate) fn request_refresh(
        &mut self,
        session: SessionKey,
        token: &str,
        id: Option<&RawValue>,
    ) -> Result<(), FrameError> {
        self.outputs.push_back(Output::Refresh(Refresh {
            session,
            token: token.to_owned(),
            id: id.map(ToOwned::to_owned),
        }));
        self.deferred = true;
        Ok(())
    }

    /// Finishes an [`Output::Refresh`] with what the authenticator made of
    /// its token: the identity it names, or why it was refused (the client
    /// gets that `error`, usually `forbidden`).
    ///
    /// An identity of the session's own user replaces the session's (its
    /// claims, for the policy's later decisions, and its
    /// [`expires_at`](Identity::expires_at), the new deadline) and is
    /// answered `ack` with the time left; another user's, or one that has
    /// already expired, is refused with `forbidden` and changes nothing. Rooms already joined are kept
    /// either way. A session that closed meanwhile is left alone.
    pub fn complete_refresh(
        &mut self,
        now: Timestamp,
        refresh: Refresh,
        result: Result<Identity, FrameError>,
    ) {
        let key = refresh.session;
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let id = refresh.id.as_deref();
        let identity = match result {
            Ok(identity) if identity.expires_at.is_some_and(|at| at <= now) => {
                let error = FrameError::new(ErrorCode::Forbidden, "the new token has expired");
                self.refuse(now, key, error, id, None);
                return;
            }
            Ok(identity) if identity.user == session.identity.user => identity,
            Ok(_) => {
                let error = FrameError::new(
                    ErrorCode::Forbidden,
                    "the new token names another user; a session keeps its user",
                );
                self.refuse(now, key, error, id, None);
                return;
            }
            Err(error) => {
                self.refuse(now, key, error, id, None);
                return;
            }
        };
        let expires_in_ms = identity.expires_at.map(|at| millis_until(now, at));
        session.identity = identity;
        // An earlier deadline is scheduled now; a later one when the old entry pops.
        self.reschedule_session(key);
        if let Some(id) = id {
            let ack = ServerFrame::Ack { id, expires_in_ms }.encode();
            self.deliver(Recipients::one(key), ack, FrameKind::Ack);
        }
    }
}

/// Milliseconds from `now` to `at`, 0 when `at` has passed.
pub(crate) fn millis_until(now: Timestamp, at: Timestamp) -> u64 {
    at.as_millis().saturating_sub(now.as_millis())
}
