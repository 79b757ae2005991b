//! `GET /v1/scans/{id}/events`: one scan's events over SSE.
//!
//! Events come from the `SCAN_EVT` stream (replay) and a core subscription
//! on the same subject (live), deduplicated by their contiguous `id`. After
//! a silence the stream is read again, so an event the live path lost (a
//! NATS restart, a reconnect) still arrives; a scan silent past the stall
//! bound, or whose events cannot be read, ends with an `error` event.

use std::{convert::Infallible, time::Duration};

use async_nats::jetstream;
use axum::{
    extract::{Path, Query, State, rejection::QueryRejection},
    http::{HeaderMap, StatusCode},
    response::{
        IntoResponse as _, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use bus::{
    subject,
    wire::{ErrorBody, ScanEvent},
};
use futures::StreamExt as _;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    AppState,
    apidoc::ScanSseEvent,
    auth::StreamUser,
    relay::RelayTiming,
    scans::{Refusal, owned, refuse, unavailable},
};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// For `EventSource`, which cannot set headers on its first request:
    /// the same as the `Last-Event-ID` header.
    #[serde(default)]
    #[param(value_type = Option<u64>, minimum = 0)]
    last_event_id: Option<String>,
}

fn parse_last_event_id(headers: &HeaderMap, query: Option<&str>) -> Result<u64, Refusal> {
    let parse = |raw: Option<&str>| match raw.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "invalid_last_event_id",
                "Last-Event-ID must be a non-negative integer event id",
            )
        }),
    };
    let header = match headers.get("last-event-id") {
        None => None,
        Some(v) => parse(Some(v.to_str().unwrap_or("invalid")))?,
    };
    // Both are checked: a bad one is the client's mistake even when the
    // other would do. The header wins, since an EventSource reconnecting
    // sends the newest id there while its URL keeps the first one.
    let query = parse(query)?;
    Ok(header.or(query).unwrap_or(0))
}

/// Turns a bus event into an SSE event: same id, name and data.
fn sse_event(event: &ScanEvent) -> Event {
    let data = match serde_json::to_value(&event.data) {
        Ok(mut v) => v["data"].take(),
        Err(_) => Value::Null,
    };
    Event::default()
        .id(event.id.to_string())
        .event(event.data.name())
        .data(data.to_string())
}

/// `GET /v1/scans/{id}/events`: every event after `Last-Event-ID` (or
/// `?last_event_id=`), then the live ones; closes after `result` or `error`.
#[utoipa::path(get, path = "/v1/scans/{id}/events", operation_id = "followScanEvents", tag = "scans",
    params(
        ("id" = String, Path, description = "The scan id"),
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event id"),
        EventsQuery,
    ),
    security(("bearer" = []), ("access_token" = [])),
    responses(
        (status = 200, description = "Server-sent events, each `id:` (contiguous from 1), `event:` \
            (`progress`, `token`, `result`, `error`) and `data:` (a `ScanEvent`'s `data`); the stream \
            closes after `result` or `error`", body = ScanSseEvent, content_type = "text/event-stream"),
        (status = 400, description = "`invalid_last_event_id`, `invalid_scan_id`", body = ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_token`, `token_expired`", body = ErrorBody),
        (status = 403, description = "`forbidden`: another user's scan", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ))]
pub async fn events(
    State(state): State<AppState>,
    StreamUser(user): StreamUser,
    Path(scan_id): Path<String>,
    query: Result<Query<EventsQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let query_id = match &query {
        Ok(Query(q)) => q.last_event_id.clone(),
        Err(_) => Some("invalid".into()),
    };
    let after = match parse_last_event_id(&headers, query_id.as_deref()) {
        Ok(n) => n,
        Err(r) => return refuse(r),
    };
    if let Err(response) = owned(&state, &user, &scan_id).await {
        return response;
    }
    let subject = subject::scan_evt(&scan_id).expect("checked token");
    // Subscribe before replaying, so nothing published in between is missed.
    let live = match state.client.subscribe(subject::live(&subject)).await {
        Ok(s) => s,
        Err(e) => return unavailable("Subscribing to scan events", e),
    };
    let replay = match replay(&state.js, &subject).await {
        Ok(r) => r,
        Err(e) => return unavailable("Replaying scan events", e),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    let js = state.js.clone();
    let shutdown = state.shutdown.clone();
    let timing = state.relay_timing;
    tokio::spawn(async move {
        let mut follow = Follow {
            tx,
            last: after,
            js,
            subject,
            timing,
        };
        tokio::select! {
            _ = follow.run(replay, live) => {}
            _ = shutdown.cancelled() => {}
        }
    });
    metrics::counter!("gateway_scan_streams_total").increment(1);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(state.sse_keepalive))
        .into_response()
}

async fn replay(js: &jetstream::Context, subject: &str) -> anyhow::Result<Vec<ScanEvent>> {
    let payloads = bus::replay::payloads(js, bus::streams::SCAN_EVT, subject).await?;
    Ok(payloads
        .iter()
        .filter_map(|p| serde_json::from_slice(p).ok())
        .collect())
}

/// Writes one scan's events to one SSE client, in id order, each once.
struct Follow {
    tx: tokio::sync::mpsc::Sender<Event>,
    last: u64,
    js: jetstream::Context,
    subject: String,
    timing: RelayTiming,
}

impl Follow {
    /// Sends the events after `self.last`; returns true when the stream is
    /// over (the last of them is terminal) or the client is gone.
    async fn send_all(&mut self, events: &[ScanEvent]) -> bool {
        for (i, event) in events.iter().enumerate() {
            if event.id <= self.last {
                continue;
            }
            if self.tx.send(sse_event(event)).await.is_err() {
                return true;
            }
            self.last = event.id;
            // A terminal event followed by more (a scan reprocessed from the
            // DLQ) is history, not the end.
            if event.data.is_terminal() && i + 1 == events.len() {
                return true;
            }
        }
        false
    }

    async fn run(&mut self, replayed: Vec<ScanEvent>, mut live: async_nats::Subscriber) {
        if self.send_all(&replayed).await {
            return;
        }
        // Resumed after the terminal event itself: nothing more will come.
        if replayed
            .last()
            .is_some_and(|e| e.data.is_terminal() && e.id <= self.last)
        {
            return;
        }
        let mut heard = tokio::time::Instant::now();
        loop {
            let message = match tokio::time::timeout(self.timing.recheck, live.next()).await {
                Ok(Some(message)) => message,
                Ok(None) => return,
                Err(_) => {
                    // Silence: an event published while this node's NATS
                    // connection was away is only in the stream.
                    let before = self.last;
                    if self.catch_up().await {
                        return;
                    }
                    if self.last > before {
                        heard = tokio::time::Instant::now();
                    } else if heard.elapsed() >= self.timing.stall {
                        metrics::counter!("gateway_relays_stalled_total").increment(1);
                        self.end_with(
                            "scan_stalled",
                            "no progress on this scan for a while; reconnect later or check its status",
                        )
                        .await;
                        return;
                    }
                    continue;
                }
            };
            heard = tokio::time::Instant::now();
            let Ok(event) = serde_json::from_slice::<ScanEvent>(&message.payload) else {
                continue;
            };
            if event.id <= self.last {
                continue;
            }
            let over = if event.id == self.last + 1 {
                self.send_all(&[event]).await
            } else {
                // A gap: core NATS dropped something; the stream has it.
                self.catch_up().await
            };
            if over {
                return;
            }
        }
    }

    /// Sends what the stream holds past `self.last`, retrying a failed read;
    /// true when the stream is over (also when the read kept failing: the
    /// client then gets an `error` event, never silence).
    async fn catch_up(&mut self) -> bool {
        for attempt in 0..3 {
            if attempt > 0 {
                tokio::time::sleep(bus::backoff::delay(
                    Duration::from_millis(200),
                    attempt - 1,
                    Duration::from_secs(2),
                ))
                .await;
            }
            match replay(&self.js, &self.subject).await {
                Ok(events) => return self.send_all(&events).await,
                Err(e) => tracing::warn!(error = %e, "Replaying scan events failed."),
            }
        }
        metrics::counter!("gateway_replays_failed_total").increment(1);
        self.end_with(
            "replay_failed",
            "the scan's stored events could not be read; reconnect later",
        )
        .await;
        true
    }

    /// An `error` event of the gateway's own: no `id`, so a client that
    /// reconnects resumes after the scan's last real event.
    async fn end_with(&self, code: &str, message: &str) {
        let data = json!({"code": code, "message": message});
        let _ = self
            .tx
            .send(Event::default().event("error").data(data.to_string()))
            .await;
    }
}
