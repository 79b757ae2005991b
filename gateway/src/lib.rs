//! The gateway: the stateless edge of the system.
//!
//! It owns authentication ([`auth`]), the HTTP API and its JSON errors
//! ([`error`]), the WebSocket chat sessions ([`ws`]), scan uploads and their
//! SSE streams ([`scans`]), what models clients may ask for ([`models`]),
//! the character catalogue, its admin routes and the caller's collection
//! (`characters`), the public disposal guide (`guide`), the API's OpenAPI
//! description ([`apidoc`]), and serving `web/`.
//! It keeps no durable state: turns go to JetStream (`chat.req.*`), live
//! frames come back on core NATS subscriptions (`chat.tok.*`), and replays
//! come from the `CHAT_TOK` stream, so any gateway node serves any client.

pub mod apidoc;
pub mod auth;
mod characters;
mod config;
mod drain;
mod erase;
pub mod error;
mod guide;
mod history;
mod inflight;
mod lang;
pub mod models;
mod openai;
mod owners;
mod relay;
mod scan_events;
pub mod scans;
mod series;
mod turns;
mod ws;

pub use turns::derive_ids;

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use axum::{
    Json, Router,
    extract::{FromRef, State},
    handler::HandlerWithoutStateExt as _,
    routing::get,
};
use bus::wire::ErrorBody;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tower_http::{services::ServeDir, trace::TraceLayer};
use utoipa::OpenApi as _;
use utoipa_axum::{router::OpenApiRouter, routes};

pub use config::Config;
use error::ApiError;

/// Shared by every request and socket: one pointer to clone. Holding the
/// state by value cost every idle WebSocket a deep copy of each KV and
/// object-store handle (each carries its stream's info).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] points to.
pub struct Shared {
    auth: Arc<auth::Authenticator>,
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    /// Conversation id -> owner, remembered.
    owners: Arc<owners::Owners>,
    turns: async_nats::jetstream::kv::Store,
    /// Scan id -> owner.
    scans: async_nats::jetstream::kv::Store,
    /// The character catalogue (`characters` KV bucket).
    characters: async_nats::jetstream::kv::Store,
    /// Uploaded images.
    scan_images: async_nats::jetstream::object_store::ObjectStore,
    /// Interval of SSE keep-alive comments.
    sse_keepalive: std::time::Duration,
    /// Each user's turns in flight, across nodes.
    in_flight: Arc<inflight::InFlight>,
    /// The models and token cap clients may ask for.
    models: Arc<models::Models>,
    /// Asks every live persister for history.
    history: bus::history::HistoryClient,
    /// Frames a socket may have queued before it counts as too slow.
    ws_outbox: usize,
    /// How long a turn's frames stay in `CHAT_TOK` (its `max_age`).
    replay_window: std::time::Duration,
    /// `CHAT_REQ`'s duplicate window: a repeated request is published
    /// again only inside it, where a second copy is dropped.
    request_dedupe_window: std::time::Duration,
    /// When relays re-read JetStream and when they give up.
    relay_timing: relay::RelayTiming,
    /// Deadline of a non-streaming OpenAI-compatible call.
    completion_timeout: std::time::Duration,
    /// Turns one WebSocket may follow at once.
    ws_max_streams: usize,
    /// The disposal guide, rendered at startup from the rules the
    /// streamer answers from (`SCAN_RULES` or the built-in file).
    guide: Arc<guide::Guide>,
    /// Cancelled on shutdown; long-lived sockets watch it so the drain ends.
    shutdown: CancellationToken,
}

impl FromRef<AppState> for Arc<guide::Guide> {
    fn from_ref(state: &AppState) -> Self {
        state.guide.clone()
    }
}

impl FromRef<AppState> for Arc<auth::Authenticator> {
    fn from_ref(state: &AppState) -> Self {
        state.auth.clone()
    }
}

/// Runs the gateway until `shutdown` fires.
///
/// # Errors
/// When startup fails (bad auth configuration, NATS unreachable, port in use).
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    Gateway::build(config, shutdown.clone())
        .await?
        .run(shutdown)
        .await
}

/// A gateway that has bound its port and connected, ready to [`Gateway::run`].
pub struct Gateway {
    listener: tokio::net::TcpListener,
    /// `GATEWAY_ADMIN_LISTEN`'s listener, when set; `run` serves ops on it.
    admin: Option<tokio::net::TcpListener>,
    /// Readiness refreshed in the background; the admin listener serves it.
    ready: bus::ops::ReadyState,
    router: Router,
}

impl Gateway {
    /// Checks the auth configuration, binds, connects to NATS and creates the
    /// streams, failing fast with an actionable message.
    ///
    /// # Errors
    /// One line saying what to fix.
    pub async fn build(config: Config, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let auth = Arc::new(auth::Authenticator::build(&config)?);
        series::register();
        let listener = bus::ops::bind(&config.listen, "GATEWAY_LISTEN").await?;
        config.check_dev_login_exposure(listener.local_addr()?)?;
        let admin = match &config.admin_listen {
            Some(addr) => Some(bus::ops::bind(addr, "GATEWAY_ADMIN_LISTEN").await?),
            None => None,
        };
        let client = config.bus.connect("gateway").await?;
        let js = async_nats::jetstream::new(client.clone());
        bus::streams::ensure_all(&js, config.bus.bus_replicas).await?;
        let conversations = js
            .get_key_value(bus::streams::KV_CONVERSATIONS)
            .await
            .context("KV bucket conversations is missing")?;
        let turns = js
            .get_key_value(bus::streams::KV_TURNS)
            .await
            .context("KV bucket chat_turns is missing")?;
        let scans = js
            .get_key_value(bus::streams::KV_SCANS)
            .await
            .context("KV bucket scans is missing")?;
        let characters = js
            .get_key_value(bus::streams::KV_CHARACTERS)
            .await
            .context("KV bucket characters is missing")?;
        let scan_images = js
            .get_object_store(bus::streams::OBJ_SCAN_IMAGES)
            .await
            .context("object store scan_images is missing")?;
        if auth.dev_login() {
            tracing::warn!(
                "Dev login is enabled: POST /v1/dev/token mints a token for any user. Never enable it in production."
            );
        }
        let history = bus::history::HistoryClient::start(client.clone(), &js).await?;
        let in_flight = inflight::InFlight::new(
            &js,
            js.get_key_value(bus::streams::KV_USER_TURNS)
                .await
                .context("KV bucket user_turns is missing")?,
            turns.clone(),
            config.max_turns_per_user,
            std::time::Duration::from_millis(config.turn_stall_ms.max(1_000)),
        );
        let state = AppState(Arc::new(Shared {
            auth,
            client,
            js,
            owners: Arc::new(owners::Owners::new(conversations)),
            turns,
            scans,
            characters,
            scan_images,
            sse_keepalive: std::time::Duration::from_millis(config.sse_keepalive_ms.max(100)),
            in_flight: Arc::new(in_flight),
            models: Arc::new(models::Models::from_config(&config)),
            history,
            ws_outbox: config.ws_outbox_frames.max(1),
            replay_window: bus::streams::definitions()?
                .into_iter()
                .find(|d| d.name == bus::streams::CHAT_TOK)
                .map(|d| d.max_age)
                .context("no CHAT_TOK definition")?,
            request_dedupe_window: bus::streams::definitions()?
                .into_iter()
                .find(|d| d.name == bus::streams::CHAT_REQ)
                .map(|d| d.duplicate_window)
                .context("no CHAT_REQ definition")?,
            relay_timing: relay::RelayTiming {
                recheck: std::time::Duration::from_millis(config.relay_recheck_ms.max(50)),
                stall: std::time::Duration::from_millis(config.turn_stall_ms.max(1_000)),
            },
            completion_timeout: std::time::Duration::from_millis(
                config.completion_timeout_ms.max(1_000),
            ),
            ws_max_streams: config.ws_max_streams.max(1),
            guide: Arc::new(guide::Guide::build(&bus::rules::Rules::load(
                config.scan_rules.as_deref(),
            )?)),
            shutdown,
        }));
        erase::follow_notices(&state);
        let ready = bus::ops::ReadyState::start(
            bus::ops::nats_ready(state.client.clone(), state.js.clone()),
            std::time::Duration::from_millis(config.ready_refresh_ms.max(100)),
            state.shutdown.clone(),
        )
        .await;
        Ok(Self {
            router: router(state, &config, ops_routes(ready.clone(), admin.is_some())),
            listener,
            admin,
            ready,
        })
    }

    /// The bound address (useful with port 0).
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The bound `GATEWAY_ADMIN_LISTEN` address, when one is set.
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn admin_addr(&self) -> std::io::Result<Option<SocketAddr>> {
        self.admin.as_ref().map(|l| l.local_addr()).transpose()
    }

    /// Serves until `shutdown` fires, then drains (bounded by [`bus::shutdown::DRAIN`]).
    ///
    /// # Errors
    /// When the server fails.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(addr = %self.listener.local_addr()?, "Gateway listening.");
        let admin = match self.admin {
            Some(listener) => {
                tracing::info!(addr = %listener.local_addr()?, "Admin (metrics, readiness) listening.");
                Some(tokio::spawn(bus::ops::serve(
                    listener,
                    self.ready,
                    shutdown.clone(),
                )))
            }
            None => None,
        };
        use axum::serve::ListenerExt as _;
        // Without TCP_NODELAY a token frame written right after `accepted`
        // waits for the client's delayed ACK (~40 ms): Nagle's algorithm.
        let listener = self.listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let server = axum::serve(listener, self.router.into_make_service())
            .with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let server = tokio::spawn(async move { server.await });
        shutdown.cancelled().await;
        match tokio::time::timeout(bus::shutdown::DRAIN, server).await {
            Ok(result) => result??,
            Err(_) => tracing::warn!("Drain timed out; closing remaining connections."),
        }
        if let Some(admin) = admin {
            // Scrapes and probes are short: it stops as soon as they end.
            let result = admin.await.map_err(anyhow::Error::from).and_then(|r| r);
            if let Err(error) = result {
                tracing::warn!(error = %format!("{error:#}"), "Admin listener failed.");
            }
        }
        tracing::info!("Gateway stopped.");
        Ok(())
    }
}

/// `/healthz`, `/readyz` and `/metrics` on the API port; with an admin
/// listener, only `/healthz` (load balancers probe the port they send
/// traffic to, and it costs nothing), and the other two answer 404 here
/// rather than fall through to the web folder.
fn ops_routes(ready: bus::ops::ReadyState, admin_apart: bool) -> Router {
    if !admin_apart {
        return bus::ops::router(ready);
    }
    Router::new()
        .route("/healthz", get(bus::ops::healthz))
        .route("/readyz", axum::routing::any(bus::ops::not_found))
        .route("/metrics", axum::routing::any(bus::ops::not_found))
}

/// Every API route, each registered from its handler's `#[utoipa::path]`,
/// so the OpenAPI document lists exactly the routes that exist.
pub fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(apidoc::ApiDoc::openapi())
        .routes(routes!(dev_token))
        .routes(routes!(ws::upgrade))
        .routes(routes!(openai::completions))
        .routes(routes!(models::list))
        .routes(routes!(models::get))
        .routes(routes!(history::list))
        .routes(routes!(history::get))
        .merge(
            OpenApiRouter::new()
                .routes(routes!(scans::upload::upload, scans::list::list))
                // The multipart parser otherwise stops at axum's 2 MB default;
                // the handler enforces the real limit itself.
                .layer(axum::extract::DefaultBodyLimit::max(scans::MAX_BODY)),
        )
        .routes(routes!(scans::status::status))
        .routes(routes!(scan_events::events))
        .routes(routes!(characters::list))
        .routes(routes!(characters::mine))
        .routes(routes!(erase::erase_me))
        .routes(routes!(characters::put, characters::delete))
        .routes(routes!(guide::list))
        .routes(routes!(guide::rule))
}

fn router(state: AppState, config: &Config, ops: Router) -> Router {
    let web = ServeDir::new(&config.web_dir).fallback(bus::ops::not_found.into_service());
    let (api, openapi) = api_routes().with_state(state).split_for_parts();
    let document = apidoc::Document::new(&openapi);
    let api = api.route(
        "/openapi.json",
        get(move || async move { document.response() }),
    );
    ops.merge(api)
        .fallback_service(web)
        .layer(axum::middleware::from_fn(drain::unread_bodies))
        .layer(
            // The span records the path only: a query may hold ?access_token=.
            TraceLayer::new_for_http().make_span_with(|request: &axum::http::Request<_>| {
                tracing::info_span!("http", method = %request.method(), path = %request.uri().path())
            }),
        )
}

/// Longest-lived dev token: 30 days.
const MAX_DEV_TOKEN_TTL: u64 = 30 * 24 * 3600;

/// Body of `POST /v1/dev/token`; both fields may be left out.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct DevTokenRequest {
    /// The token's `sub` (default `dev-user`); any non-empty string.
    #[serde(default)]
    #[schema(min_length = 1)]
    user_id: Option<String>,
    /// Lifetime in seconds, 1 to 30 days' worth (default one day).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 2_592_000)]
    ttl_seconds: Option<u64>,
}

/// A token from `POST /v1/dev/token`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct DevToken {
    /// The JWT, for `Authorization: Bearer` or `?access_token=`.
    access_token: String,
    /// Always `Bearer`.
    token_type: &'static str,
    /// Seconds until it expires.
    expires_in: u64,
    /// Its `sub`.
    user_id: String,
}

/// Issues a token for any user id: development only, 404 unless
/// `GATEWAY_DEV_LOGIN` is on.
#[utoipa::path(post, path = "/v1/dev/token", operation_id = "createDevToken", tag = "auth", security(()),
    request_body(content = Option<DevTokenRequest>, description = "Optional; an empty body takes the defaults"),
    responses(
        (status = 200, description = "A signed token", body = DevToken),
        (status = 400, description = "`invalid_user_id`, `invalid_ttl`, `invalid_json`, `invalid_request` (a field of the wrong type)", body = ErrorBody),
        (status = 404, description = "Dev login is off", body = ErrorBody),
    ))]
async fn dev_token(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Json<DevToken>, ApiError> {
    if !state.auth.dev_login() {
        return Err(ApiError::NotFound(
            "dev login is not enabled (GATEWAY_DEV_LOGIN)".into(),
        ));
    }
    // Read by hand: axum's Json extractor answers a wrong type with a
    // plain-text 422, where every other refusal here is a JSON 400.
    let request = if body.iter().all(u8::is_ascii_whitespace) {
        DevTokenRequest {
            user_id: None,
            ttl_seconds: None,
        }
    } else {
        let value: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest {
                code: "invalid_json",
                message: format!("body: not JSON ({e})"),
            })?;
        // serde would also read a struct from an array (`[null, null]`).
        if !value.is_object() {
            return Err(ApiError::BadRequest {
                code: "invalid_request",
                message: "body: must be a JSON object".into(),
            });
        }
        serde_json::from_value(value).map_err(|e| ApiError::BadRequest {
            code: "invalid_request",
            message: format!("body: {e}"),
        })?
    };
    let user_id = request.user_id.unwrap_or_else(|| "dev-user".into());
    // Any non-empty id, like the subs real identity providers issue.
    if user_id.is_empty() {
        return Err(ApiError::BadRequest {
            code: "invalid_user_id",
            message: "user_id must not be empty".into(),
        });
    }
    let ttl = request.ttl_seconds.unwrap_or(24 * 3600);
    if !(1..=MAX_DEV_TOKEN_TTL).contains(&ttl) {
        return Err(ApiError::BadRequest {
            code: "invalid_ttl",
            message: format!("ttl_seconds must be from 1 to {MAX_DEV_TOKEN_TTL}"),
        });
    }
    let token = state.auth.issue(&user_id, ttl)?;
    Ok(Json(DevToken {
        access_token: token,
        token_type: "Bearer",
        expires_in: ttl,
        user_id,
    }))
}
