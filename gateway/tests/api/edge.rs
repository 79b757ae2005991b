//! The hardened edge: dev login stays on loopback unless overridden,
//! `/readyz` answers without calling the bus, and ops endpoints can move to
//! `GATEWAY_ADMIN_LISTEN`.

use std::{net::SocketAddr, time::Duration};

use futures::StreamExt as _;
use serde_json::Value;
use testkit::NatsServer;
use tokio_util::sync::CancellationToken;

use crate::helpers::gateway_config;

/// A gateway built from `extra` flags on `nats`, served until the token
/// is dropped; its API and admin addresses.
struct Edge {
    addr: SocketAddr,
    admin: Option<SocketAddr>,
    http: reqwest::Client,
    _shutdown: tokio_util::sync::DropGuard,
}

impl Edge {
    async fn start(nats: &NatsServer, extra: &[&str]) -> Self {
        Self::start_on(nats, "127.0.0.1:0", extra).await
    }

    /// With the API on `listen`.
    async fn start_on(nats: &NatsServer, listen: &str, extra: &[&str]) -> Self {
        testkit::init_logs();
        let shutdown = CancellationToken::new();
        let gateway = gateway::Gateway::build(on(listen, nats, extra), shutdown.clone())
            .await
            .unwrap();
        let addr = gateway.local_addr().unwrap();
        let admin = gateway.admin_addr().unwrap();
        tokio::spawn(gateway.run(shutdown.clone()));
        Self {
            addr,
            admin,
            http: reqwest::Client::new(),
            _shutdown: shutdown.drop_guard(),
        }
    }

    async fn get(&self, addr: SocketAddr, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("http://{addr}{path}"))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// Polls `/readyz` until it answers `status`; returns the body.
    async fn wait_readyz(&self, status: u16, within: Duration) -> Value {
        testkit::wait_for(&format!("/readyz {status}"), within, || async {
            let (got, body) = self.get(self.addr, "/readyz").await;
            (got == status).then_some(body)
        })
        .await
        .unwrap()
    }
}

fn on(listen: &str, nats: &NatsServer, extra: &[&str]) -> gateway::Config {
    gateway::Config {
        listen: listen.to_owned(),
        ..gateway_config(&nats.url(), extra)
    }
}

#[tokio::test]
async fn dev_login_refuses_a_public_listen_address_unless_overridden() {
    let nats = NatsServer::start().await.unwrap();
    let shutdown = CancellationToken::new();
    let public = on("0.0.0.0:0", &nats, &["--dev-login"]);
    let error = gateway::Gateway::build(public, shutdown.clone())
        .await
        .err()
        .expect("dev login on 0.0.0.0 is refused");
    let message = format!("{error:#}");
    assert!(message.contains("GATEWAY_LISTEN=0.0.0.0:0"), "{message}");
    assert!(
        message.contains("GATEWAY_DEV_LOGIN_ALLOW_PUBLIC=true"),
        "{message}"
    );
    assert!(!message.contains('\n'), "one line: {message}");

    // The override lets it start, and dev login works.
    let overridden = Edge::start_on(
        &nats,
        "0.0.0.0:0",
        &["--dev-login", "--dev-login-allow-public"],
    )
    .await;
    let local: SocketAddr = format!("127.0.0.1:{}", overridden.addr.port())
        .parse()
        .unwrap();
    let token = overridden
        .http
        .post(format!("http://{local}/v1/dev/token"))
        .send()
        .await
        .unwrap();
    assert_eq!(token.status(), 200);

    // Loopback needs no override, as an address or as `localhost`.
    for listen in ["127.0.0.1:0", "localhost:0"] {
        let loopback = Edge::start_on(&nats, listen, &["--dev-login"]).await;
        assert!(loopback.addr.ip().is_loopback(), "{listen}");
    }
    // Without dev login, a public address is the operator's business.
    Edge::start_on(&nats, "0.0.0.0:0", &[]).await;
}

#[tokio::test]
async fn a_burst_of_readyz_requests_makes_no_jetstream_calls() {
    let nats = NatsServer::start().await.unwrap();
    // No background refresh during the burst: whatever JetStream sees comes
    // from the requests themselves.
    let edge = Edge::start(&nats, &["--ready-refresh-ms", "600000"]).await;
    let before = nats.jetstream_api_calls().await.unwrap();
    let statuses: Vec<u16> = futures::stream::iter(0..500)
        .map(|_| async { edge.get(edge.addr, "/readyz").await.0 })
        .buffer_unordered(50)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let after = nats.jetstream_api_calls().await.unwrap();
    assert_eq!(after, before, "JetStream API calls during 500 /readyz");

    // The count is live: one call of our own shows.
    let js = async_nats::jetstream::new(nats.client().await.unwrap());
    js.get_stream(bus::streams::CHAT_TOK).await.unwrap();
    testkit::wait_for("our own call counted", Duration::from_secs(5), || async {
        (nats.jetstream_api_calls().await.unwrap() > after).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn readiness_turns_unready_when_nats_goes_away_and_ready_when_it_returns() {
    let mut nats = NatsServer::start().await.unwrap();
    let edge = Edge::start(&nats, &["--ready-refresh-ms", "200"]).await;
    let body = edge.wait_readyz(200, Duration::from_secs(1)).await;
    assert_eq!(body["checks"]["nats"], "connected");

    nats.stop();
    let body = edge.wait_readyz(503, Duration::from_secs(5)).await;
    assert_eq!(body["status"], "unavailable", "{body}");

    nats.start_again().await.unwrap();
    // The client's reconnect backoff, then one refresh.
    let body = edge.wait_readyz(200, Duration::from_secs(20)).await;
    assert_eq!(body["checks"]["streams"], "present", "{body}");
}

#[tokio::test]
async fn admin_listen_serves_metrics_and_readiness_apart_from_the_api() {
    let nats = NatsServer::start().await.unwrap();
    let edge = Edge::start(&nats, &["--admin-listen", "127.0.0.1:0"]).await;
    let admin = edge.admin.expect("an admin address");
    assert_ne!(admin, edge.addr);

    let (status, body) = edge.get(admin, "/readyz").await;
    assert_eq!(status, 200);
    assert_eq!(body["checks"]["nats"], "connected");
    let metrics = edge
        .http
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics.text().await.unwrap().contains("gateway_"));
    assert_eq!(edge.get(admin, "/healthz").await.0, 200);
    // The admin port serves nothing of the API.
    let (status, body) = edge.get(admin, "/v1/models").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");

    // The API port keeps /healthz for load balancers, and nothing else of ops.
    for path in ["/readyz", "/metrics"] {
        let (status, body) = edge.get(edge.addr, path).await;
        assert_eq!(status, 404, "{path} on the API port");
        assert_eq!(body["error"]["code"], "not_found", "{path}");
    }
    assert_eq!(edge.get(edge.addr, "/healthz").await.0, 200);

    // Without it, everything stays on the API port.
    let plain = Edge::start(&nats, &[]).await;
    assert!(plain.admin.is_none());
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(plain.get(plain.addr, path).await.0, 200, "{path}");
    }

    // A taken admin address fails fast, naming the setting.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = gateway_config(
        &nats.url(),
        &["--admin-listen", &taken.local_addr().unwrap().to_string()],
    );
    let error = gateway::Gateway::build(config, CancellationToken::new())
        .await
        .err()
        .expect("a taken admin address is refused");
    assert!(
        format!("{error:#}").contains("GATEWAY_ADMIN_LISTEN"),
        "{error:#}"
    );
}
