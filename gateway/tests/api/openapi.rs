//! `GET /openapi.json`, and one regression test per fault schemathesis
//! (e2e/tests/schemathesis.rs) found: each was a refusal in the wrong shape
//! (plain text, 422, 503) or a request outside the document accepted.

use serde_json::{Value, json};

use crate::{
    answer,
    helpers::{TestApp, token_for},
};

impl TestApp {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<&str>) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, self.url(path))
            .bearer_auth(token_for("alice", 3600));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{path}: {status} is not JSON: {text:?}"));
        (status, value)
    }
}

fn code(value: &Value) -> &str {
    value["error"]["code"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn the_document_is_served_and_lists_every_route() {
    let app = TestApp::start_with(answer(), &["--dev-login"]).await;
    let response = app.http.get(app.url("/openapi.json")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let doc: Value = response.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1."));
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/v1/chat/ws",
        "/v1/chat/completions",
        "/v1/models",
        "/v1/conversations/{id}",
        "/v1/scans",
        "/v1/scans/{id}/events",
        "/v1/characters",
        "/v1/admin/characters/{id}",
        "/v1/dev/token",
        "/v1/guide",
        "/v1/guide/{category}",
    ] {
        assert!(paths.contains_key(path), "{path} missing");
    }
    // Every documented operation exists: none falls through to the web
    // folder's 404 or answers 405.
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let concrete = path.replace("{id}", "x");
            let response = app
                .http
                .request(method.to_uppercase().parse().unwrap(), app.url(&concrete))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap();
            assert_ne!(status, 405, "{method} {path}");
            assert!(
                !(status == 404 && body.contains("no route for")),
                "{method} {path} is documented but not routed"
            );
        }
    }
}

#[tokio::test]
async fn refusals_found_by_the_fuzzer_are_json_400s() {
    let app = TestApp::start_with(answer(), &["--dev-login"]).await;
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    // Limits beyond the cap were silently capped, while the document says 1..=cap.
    let (status, body) = app
        .call(get.clone(), "/v1/conversations?limit=2147483648", None)
        .await;
    assert_eq!((status, code(&body)), (400, "invalid_limit"));
    let (status, body) = app.call(get.clone(), "/v1/scans?limit=101", None).await;
    assert_eq!((status, code(&body)), (400, "invalid_limit"));
    // (No persister runs here: the cap itself passes the check.)
    let (status, _) = app.call(get.clone(), "/v1/scans?limit=100", None).await;
    assert_ne!(status, 400);
    // A repeated query parameter got axum's plain-text rejection.
    let (status, body) = app
        .call(get.clone(), "/v1/conversations/c1?limit=1&limit=2", None)
        .await;
    assert_eq!((status, code(&body)), (400, "invalid_query"));
    // An id that is a subject token but not a KV key was a 503.
    for path in [
        "/v1/scans/%F1%A1%AD%9Fd",
        "/v1/scans/%F1%A1%AD%9Fd/events",
        "/v1/conversations/%C3%A9",
    ] {
        let (status, body) = app.call(get.clone(), path, None).await;
        assert_eq!(status, 400, "{path}: {body}");
    }
    // A bad `last_event_id` was ignored when a good header came with it.
    let response = app
        .http
        .get(app.url("/v1/scans/s1/events?last_event_id=-1015"))
        .bearer_auth(token_for("alice", 3600))
        .header("last-event-id", "3")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(code(&body), "invalid_last_event_id");
    // Dev login: a wrong type was a plain-text 422, an array was read as
    // the struct, and any ttl was clamped.
    for (body, expected) in [
        (json!({"user_id": {}}).to_string(), "invalid_request"),
        ("[null, null]".to_owned(), "invalid_request"),
        ("{".to_owned(), "invalid_json"),
        (json!({"ttl_seconds": 0}).to_string(), "invalid_ttl"),
        (
            json!({"ttl_seconds": 9_223_372_036_854_775_808u64}).to_string(),
            "invalid_ttl",
        ),
    ] {
        let (status, value) = app.call(post.clone(), "/v1/dev/token", Some(&body)).await;
        assert_eq!((status, code(&value)), (400, expected), "{body}");
    }
    let (status, value) = app
        .call(
            post.clone(),
            "/v1/dev/token",
            Some(&json!({"user_id": "bob", "ttl_seconds": 60}).to_string()),
        )
        .await;
    assert_eq!((status, value["expires_in"].as_u64()), (200, Some(60)));
}
