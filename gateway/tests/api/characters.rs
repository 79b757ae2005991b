//! The character catalogue over HTTP: reading it, the admin's changes (and
//! who may make them), and those changes reaching every streamer's match
//! cache without a restart.

use std::time::{Duration, Instant};

use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};
use streamer::catalogue::{Catalogue, MatchCache};
use tokio_util::sync::CancellationToken;

use crate::{
    helpers::{SECRET, TestApp, token_for},
    rewards::{app_with_vision, result_of, vision_saying},
    scans::{answer, fixture},
};

/// A token whose `claim` is `role`.
fn token_with(user: &str, claim: &str, role: Value) -> String {
    let exp = chrono::Utc::now().timestamp() + 3600;
    jsonwebtoken::encode(
        &Header::default(),
        &json!({"sub": user, "exp": exp, claim: role}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn sparkle() -> Value {
    json!({
        "name": {"ko": "반짝이", "en": "Sparkle"},
        "description": {"ko": "유리 조각을 모으는 별.", "en": "A star that gathers glass."},
        "categories": ["glass", "metal_can"],
        "priority": 99
    })
}

impl TestApp {
    async fn put_character(&self, token: &str, id: &str, body: &str) -> (u16, Value) {
        let response = self
            .http
            .put(self.url(&format!("/v1/admin/characters/{id}")))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn delete_character(&self, token: &str, id: &str) -> u16 {
        self.http
            .delete(self.url(&format!("/v1/admin/characters/{id}")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    async fn get_json(&self, token: &str, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

#[tokio::test]
async fn the_catalogue_is_listed_and_only_admins_change_it_and_bad_bodies_name_the_field() {
    let app = TestApp::start(answer()).await;
    let user = token_for("ursula", 3600);
    let (status, body) = app.get_json(&user, "/v1/characters").await;
    assert_eq!(status, 200);
    let characters = body["characters"].as_array().unwrap();
    assert_eq!(
        characters.len(),
        Catalogue::built_in().unwrap().characters.len()
    );
    assert_eq!(
        characters[0]["character_id"], "volty",
        "highest priority first"
    );
    assert_eq!(characters[0]["name"]["ko"], "볼티");
    assert!(characters[0]["categories"].is_array());
    let unauthenticated = app
        .http
        .get(app.url("/v1/characters"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);

    // Not an admin: 403, whatever the body; nothing changes.
    let body = sparkle().to_string();
    for token in [
        user.clone(),
        token_with("ursula", "role", json!("user")),
        token_with("ursula", "roles", json!("admin")),
    ] {
        let (status, error) = app.put_character(&token, "sparkle", &body).await;
        assert_eq!(
            (status, error["error"]["code"].as_str()),
            (403, Some("forbidden"))
        );
        assert_eq!(app.delete_character(&token, "petty").await, 403);
    }
    let response = app
        .http
        .put(app.url("/v1/admin/characters/sparkle"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    let admin = token_with("ada", "role", json!("admin"));
    let bad = |edit: &dyn Fn(&mut Value)| {
        let mut v = sparkle();
        edit(&mut v);
        v.to_string()
    };
    let cases: Vec<(String, &str, &str)> = vec![
        (
            bad(&|v| v["priority"] = "high".into()),
            "priority",
            "invalid_character",
        ),
        (
            bad(&|v| v["name"]["en"] = "".into()),
            "name.en",
            "invalid_character",
        ),
        (
            bad(&|v| v["categories"] = json!(["lava"])),
            "categories[0]",
            "invalid_character",
        ),
        (
            bad(&|v| v["categories"] = json!(["unknown"])),
            "categories[0]",
            "invalid_character",
        ),
        (
            bad(&|v| {
                v.as_object_mut().unwrap().remove("description");
            }),
            "description",
            "invalid_character",
        ),
        (
            bad(&|v| v["colour"] = "blue".into()),
            "colour",
            "invalid_character",
        ),
        (
            bad(&|v| v["character_id"] = "other".into()),
            "character_id",
            "invalid_character",
        ),
        ("{not json".into(), "body", "invalid_json"),
    ];
    for (body, field, code) in cases {
        let (status, error) = app.put_character(&admin, "sparkle", &body).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(error["error"]["code"], code);
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(field), "{field}: {message}");
    }
    let (status, error) = app
        .put_character(&admin, "Bad.Id", &sparkle().to_string())
        .await;
    assert_eq!(status, 400);
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("character_id")
    );
    let (_, body) = app.get_json(&user, "/v1/characters").await;
    assert!(
        body["characters"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["character_id"] != "sparkle")
    );

    // An admin (the claim may also be a list of roles) creates, replaces, deletes.
    let (status, created) = app
        .put_character(&admin, "sparkle", &sparkle().to_string())
        .await;
    assert_eq!(status, 201);
    assert_eq!(created["character_id"], "sparkle");
    let listed = token_with("ada", "role", json!(["editor", "admin"]));
    let mut replaced = sparkle();
    replaced["priority"] = 1.into();
    let (status, _) = app
        .put_character(&listed, "sparkle", &replaced.to_string())
        .await;
    assert_eq!(status, 200);
    let (_, body) = app.get_json(&user, "/v1/characters").await;
    let found = body["characters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["character_id"] == "sparkle")
        .unwrap()
        .clone();
    assert_eq!(found["priority"], 1);
    assert_eq!(app.delete_character(&admin, "sparkle").await, 204);
    assert_eq!(app.delete_character(&admin, "sparkle").await, 404);
}

#[tokio::test]
async fn the_role_claim_name_is_configurable() {
    let app = TestApp::start_with(
        answer(),
        &["--auth-role-claim", "https://example.com/roles"],
    )
    .await;
    let body = sparkle().to_string();
    let plain = token_with("ada", "role", json!("admin"));
    assert_eq!(app.put_character(&plain, "sparkle", &body).await.0, 403);
    let custom = token_with("ada", "https://example.com/roles", json!(["admin"]));
    assert_eq!(app.put_character(&custom, "sparkle", &body).await.0, 201);
}

#[tokio::test]
async fn an_admin_upsert_reaches_two_streamers_caches_within_a_second_and_changes_the_next_scan() {
    let vision = vision_saying("glass").await;
    let app = app_with_vision(&vision, &[]).await;
    let js = app.js().await;
    let stop = CancellationToken::new();
    // Two more streamers' caches on the same bucket (the app runs a third).
    let bucket = js.get_key_value(bus::streams::KV_CHARACTERS).await.unwrap();
    let caches = [
        MatchCache::start(bucket.clone(), stop.clone()),
        MatchCache::start(bucket.clone(), stop.clone()),
    ];
    let best = |cache: &MatchCache| {
        let cache = cache.clone();
        async move { cache.best_for("glass").await.map(|c| c.character_id) }
    };
    for cache in &caches {
        assert_eq!(best(cache).await.as_deref(), Some("glassy"));
    }
    let first = app.scan("gina", fixture("coffee.jpg")).await;
    assert_eq!(
        result_of(&app, "gina", &first).await["reward"]["character_id"],
        "glassy"
    );

    let admin = token_with("ada", "role", json!("admin"));
    let (status, _) = app
        .put_character(&admin, "sparkle", &sparkle().to_string())
        .await;
    assert_eq!(status, 201);
    let changed = Instant::now();
    for cache in &caches {
        testkit::wait_for(
            "the cache to follow the upsert",
            Duration::from_secs(1),
            || {
                let best = best(cache);
                async move { (best.await.as_deref() == Some("sparkle")).then_some(()) }
            },
        )
        .await
        .unwrap();
    }
    assert!(changed.elapsed() < Duration::from_secs(1));
    let next = app.scan("gina", fixture("rocket.jpg")).await;
    let record = result_of(&app, "gina", &next).await;
    assert_eq!(record["reward"]["character_id"], "sparkle");
    assert_eq!(record["reward"]["name"]["en"], "Sparkle");
    assert_eq!(record["reward"]["new"], true);

    // A delete reaches them too; and the file does not seed it back.
    assert_eq!(app.delete_character(&admin, "glassy").await, 204);
    assert_eq!(app.delete_character(&admin, "sparkle").await, 204);
    for cache in &caches {
        testkit::wait_for(
            "the cache to follow the delete",
            Duration::from_secs(1),
            || {
                let best = best(cache);
                async move { best.await.is_none().then_some(()) }
            },
        )
        .await
        .unwrap();
    }
    let seeded = Catalogue::built_in().unwrap().seed(&bucket).await.unwrap();
    assert!(!seeded, "a bucket that was written is not seeded again");
    let restarted = MatchCache::start(bucket, stop.clone());
    assert_eq!(best(&restarted).await, None, "deletes survive a restart");
    let after = app.scan("gina", fixture("astronaut.jpg")).await;
    assert_eq!(result_of(&app, "gina", &after).await["reward"], Value::Null);
    stop.cancel();
}
