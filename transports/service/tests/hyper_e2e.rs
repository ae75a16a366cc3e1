//! The service on plain hyper, through the crate's own `Server` loop: every
//! route with real clients of every transport
//! (`switchboard_testkit::conformance`), at the root and under a base path.

use std::net::SocketAddr;

use switchboard_runtime::Switchboard;
use switchboard_service::{Options, Server, SwitchboardService};
use switchboard_testkit::{conformance, http, API_KEY};

/// Serves `service` on 127.0.0.1:0 until the test's runtime ends.
async fn serve(service: SwitchboardService) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("an address");
    tokio::spawn(async move {
        Server::default()
            .serve(listener, service, std::future::pending())
            .await;
    });
    addr
}

#[tokio::test]
async fn every_route_works_on_plain_hyper() {
    let switchboard = Switchboard::builder().build().expect("a switchboard");
    let addr = serve(SwitchboardService::new(
        &switchboard,
        Options::default().api_key(API_KEY),
    ))
    .await;
    conformance(addr, "").await;
}

#[tokio::test]
async fn every_route_works_on_plain_hyper_under_a_base_path() {
    let switchboard = Switchboard::builder().build().expect("a switchboard");
    let addr = serve(SwitchboardService::new(
        &switchboard,
        Options::default().api_key(API_KEY).base_path("/rt"),
    ))
    .await;
    conformance(addr, "/rt").await;
    assert_eq!(http(addr, "GET", "/ws", &[], b"").await.status, 404);
}
