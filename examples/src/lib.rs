//! Runnable Switchboard apps.
