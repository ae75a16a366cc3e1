//! Switchboard in front of an application's own service.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use http_body_util::Either;

use crate::{ResponseBody, SwitchboardService};

/// A tower `Layer` that serves Switchboard's routes and passes every other
/// request to the service it wraps, the way socketioxide mounts in axum
/// (`Router::layer`), hyper or salvo.
///
/// ```no_run
/// # fn demo(switchboard: switchboard_runtime::Switchboard) {
/// use switchboard_service::{Options, SwitchboardService};
/// let layer = SwitchboardService::new(&switchboard, Options::default().base_path("/rt")).layer();
/// // axum: Router::new().route("/", get(index)).layer(layer)
/// # let _ = layer; }
/// ```
#[derive(Debug, Clone)]
pub struct SwitchboardLayer {
    switchboard: SwitchboardService,
}

impl SwitchboardLayer {
    /// A layer serving `switchboard`'s routes.
    #[must_use]
    pub fn new(switchboard: SwitchboardService) -> Self {
        Self { switchboard }
    }
}

impl<S> tower_layer::Layer<S> for SwitchboardLayer {
    type Service = WithSwitchboard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        WithSwitchboard {
            switchboard: self.switchboard.clone(),
            inner,
        }
    }
}

/// The service [`SwitchboardLayer`] makes: Switchboard's routes, then `S`.
#[derive(Debug, Clone)]
pub struct WithSwitchboard<S> {
    switchboard: SwitchboardService,
    inner: S,
}

/// The future returned when [`WithSwitchboard`] is called as a tower `Service`.
pub type LayeredFuture<B, E> = Pin<Box<dyn Future<Output = Result<Response<B>, E>> + Send>>;

impl<S, B, ResB> tower_service::Service<Request<B>> for WithSwitchboard<S>
where
    S: tower_service::Service<Request<B>, Response = Response<ResB>>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    type Response = Response<Either<ResponseBody, ResB>>;
    type Error = S::Error;
    type Future = LayeredFuture<Either<ResponseBody, ResB>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match self.switchboard.route(request.uri().path()) {
            Some(route) => {
                let switchboard = self.switchboard.clone();
                Box::pin(async move {
                    Ok(switchboard
                        .serve_route(route, request)
                        .await
                        .map(Either::Left))
                })
            }
            None => {
                let future = self.inner.call(request);
                Box::pin(async move { future.await.map(|r| r.map(Either::Right)) })
            }
        }
    }
}
