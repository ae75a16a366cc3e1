//! Identifiers: small copyable handles for the caller, validated names for the wire.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

slotmap::new_key_type! {
    /// A handle to a session inside one [`Hub`](crate::Hub).
    ///
    /// Small and `Copy`, like quinn's `ConnectionHandle`: the caller keeps it
    /// beside its own per-connection state and passes it back on every call.
    /// A handle of a session that has gone is never reused for another session
    /// (slotmap versions it), so a late call with a stale handle is harmless.
    /// Runtimes can index their own tables with `slotmap::SecondaryMap`.
    pub struct SessionKey;

    /// A handle to a room inside one [`Hub`](crate::Hub); stale handles are harmless.
    pub struct RoomId;
}

/// Maximum length in bytes of a room name (PROTOCOL.md, Rooms).
pub const MAX_ROOM_NAME_BYTES: usize = 128;

/// Why a string is not a valid room name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RoomNameError {
    /// The name is empty.
    #[error("room name is empty")]
    Empty,
    /// The name is longer than 128 bytes.
    #[error("room name is longer than {MAX_ROOM_NAME_BYTES} bytes")]
    TooLong,
    /// The name has a byte outside `A-Z a-z 0-9 _ - . : /`.
    #[error("room name may only hold A-Z a-z 0-9 _ - . : /")]
    BadChar,
}

/// A validated room name: 1 to 128 bytes of `A-Z a-z 0-9 _ - . : /`.
///
/// Once you hold one it is valid ("parse, don't validate"); cloning is an
/// atomic increment.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

impl RoomName {
    /// Checks `name` against the protocol's rules.
    ///
    /// # Errors
    /// [`RoomNameError`] says which rule the name breaks.
    pub fn new(name: &str) -> Result<Self, RoomNameError> {
        Self::validate(name)?;
        Ok(Self(Arc::from(name)))
    }

    /// Checks a name without allocating.
    ///
    /// # Errors
    /// [`RoomNameError`] says which rule the name breaks.
    pub fn validate(name: &str) -> Result<(), RoomNameError> {
        if name.is_empty() {
            return Err(RoomNameError::Empty);
        }
        if name.len() > MAX_ROOM_NAME_BYTES {
            return Err(RoomNameError::TooLong);
        }
        let ok = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'/'));
        if ok {
            Ok(())
        } else {
            Err(RoomNameError::BadChar)
        }
    }

    /// The name as a string slice.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for RoomName {
    type Err = RoomNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Borrow<str> for RoomName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for RoomName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! opaque_string {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Wraps a string.
            #[must_use]
            pub fn new(value: &str) -> Self {
                Self(Arc::from(value))
            }

            /// The string.
            #[must_use]
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                Self::new(value)
            }
        }

        impl From<String> for $name {
            fn from(value: String) -> Self {
                Self(Arc::from(value))
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

opaque_string!(
    /// A session id as it appears on the wire (`welcome.sid`, `from.sid`,
    /// `direct.to.sid`). The caller draws it (at least 128 random bits, URL-safe
    /// base64); the core only compares it.
    Sid
);

opaque_string!(
    /// A user id, decided by the caller's authentication. A user may have many
    /// sessions (tabs); presence counts users, not sessions.
    UserId
);

opaque_string!(
    /// A room's history epoch: fixed when the room's history starts, changed
    /// whenever history is lost, so a client's `since` can tell a gap from a
    /// replay.
    Epoch
);
