//! The warp adapter through the shared conformance run: every route with
//! real clients of every transport, next to an app route of its own.

use std::net::SocketAddr;

use switchboard_runtime::Switchboard;
use switchboard_testkit::{conformance, http, API_KEY};
use switchboard_warp::Options;
use warp::Filter;

async fn serve(options: Options) -> SocketAddr {
    let switchboard = Switchboard::builder().build().expect("a switchboard");
    let app = switchboard_warp::routes(&switchboard, options)
        .or(warp::path::end().map(|| "the app's own route"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("an address");
    tokio::spawn(warp::serve(app).incoming(listener).run());
    addr
}

#[tokio::test]
async fn every_route_works_next_to_the_app() {
    let addr = serve(Options::default().api_key(API_KEY)).await;
    conformance(addr, "").await;
    assert_eq!(
        http(addr, "GET", "/", &[], b"").await.body,
        b"the app's own route"
    );
}

#[tokio::test]
async fn every_route_works_under_a_base_path() {
    let addr = serve(Options::default().api_key(API_KEY).base_path("/live")).await;
    conformance(addr, "/live").await;
}
