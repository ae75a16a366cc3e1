//! Mounts Switchboard in an axum app: every route ([`router`], or
//! [`layer`] in front of the app), plus an extractor for the user the
//! Switchboard's `Authenticator` sees ([`Authenticated`]), so the app's own
//! routes know who is calling the same way sessions do.
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use switchboard_axum::{Authenticated, Options};
//! use switchboard_runtime::Switchboard;
//!
//! async fn me(Authenticated(who): Authenticated) -> String {
//!     format!("hello {}", who.user.as_str())
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let switchboard = Switchboard::builder().build()?;
//! let app = Router::new()
//!     .route("/me", get(me))
//!     .merge(switchboard_axum::router(&switchboard, Options::default()))
//!     .with_state(switchboard.clone());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! The handle itself needs no extractor of this crate: `Switchboard` is
//! `Clone`, so `State<Switchboard>` works with `.with_state(switchboard)`,
//! and an app state holding it implements `FromRef` for it.
//!
//! All the logic lives in [`switchboard_service`]; this crate only registers
//! its paths with axum.

use axum::extract::{FromRef, FromRequestParts, OptionalFromRequestParts};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http::request::Parts;
use switchboard_core::Identity;
use switchboard_runtime::{http_api, Refusal, Switchboard};
use switchboard_service::{Route, SwitchboardService};

pub use switchboard_service::{Options, SwitchboardLayer};

/// A router with every Switchboard route `options` turns on, at their paths
/// under `options.base_path`; `.merge` it into the app (or `.nest` it, with
/// an empty base path).
pub fn router<S>(switchboard: &Switchboard, options: Options) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let service = SwitchboardService::new(switchboard, options);
    Route::ALL
        .into_iter()
        .filter(|route| service.route(&service.path_of(*route)).is_some())
        .fold(Router::new(), |router, route| {
            router.route_service(&service.path_of(route), service.clone())
        })
}

/// Switchboard's routes as a layer in front of the whole app
/// (`Router::layer`): they are answered before axum routes the request.
#[must_use]
pub fn layer(switchboard: &Switchboard, options: Options) -> SwitchboardLayer {
    SwitchboardService::new(switchboard, options).layer()
}

/// The caller of one of the app's own routes, as the Switchboard's
/// `Authenticator` (and origin check) identifies it: the same user id its
/// sessions get. Refused requests answer 403 (`forbidden`) with the
/// protocol's JSON error; use `Option<Authenticated>` where signing in is
/// optional.
///
/// Needs the `Switchboard` in the router's state (`Switchboard:
/// FromRef<S>`).
#[derive(Debug, Clone)]
pub struct Authenticated(pub Identity);

/// Why [`Authenticated`] refused a request: answers with the refusal's
/// status and `{"error": {"code", "message"}}`.
#[derive(Debug, Clone)]
pub struct Refused(pub Refusal);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let refusal = self.0;
        http_api::error(refusal.http_status(), refusal.code, &refusal.message)
            .map(axum::body::Body::from)
    }
}

impl<S> FromRequestParts<S> for Authenticated
where
    Switchboard: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = Refused;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Switchboard::from_ref(state)
            .identify(parts)
            .await
            .map(Self)
            .map_err(Refused)
    }
}

impl<S> OptionalFromRequestParts<S> for Authenticated
where
    Switchboard: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(Switchboard::from_ref(state)
            .identify(parts)
            .await
            .ok()
            .map(Self))
    }
}
