//! The disposal guide: `GET /v1/guide?lang=ko|en` (every category with its
//! bin) and `GET /v1/guide/{category}?lang=` (one rule: bin, steps, why,
//! items). Public and read-only: the same rules file the streamer answers
//! from ([`bus::rules`]), rendered once at startup into bodies with a
//! strong `ETag`, so a request is a map lookup and a revalidation is a 304.
//! The chat's `sources` link here. The handlers take the guide by
//! `FromRef`, so the API router (state `AppState`) and a test's bare router
//! serve the same handlers.

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{Path, Query, State, rejection::QueryRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bus::{rules::Rules, wire::ErrorBody};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::ApiError;

/// How long clients and shared caches may keep a guide page: the rules
/// change with a deploy, and `ETag` makes a stale copy cheap to recheck.
const CACHE_CONTROL: &str = "public, max-age=300";

/// The languages a guide page comes in.
const LANGS: [&str; 2] = ["ko", "en"];

/// `GET /v1/guide`'s body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct GuideList {
    /// `ko` or `en`.
    lang: &'static str,
    /// Every category, in the rules file's order.
    categories: Vec<GuideEntry>,
}

/// One category of [`GuideList`].
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct GuideEntry {
    /// The category (`glass`, `pet_bottle`, ...): `GET /v1/guide/{category}`.
    category: String,
    /// Its name.
    name: String,
    /// Which bin or collection it goes to.
    bin: String,
    /// Everyday names of its items in both languages, for search.
    items: Vec<String>,
}

/// `GET /v1/guide/{category}`'s body: one rule in one language.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct GuideRule {
    /// `ko` or `en`.
    lang: &'static str,
    /// The category.
    category: String,
    /// Its name.
    name: String,
    /// Which bin or collection it goes to.
    bin: String,
    /// How to prepare it, step by step.
    steps: Vec<String>,
    /// Why it is separated this way.
    why: String,
    /// Everyday names of its items in this language.
    items: Vec<String>,
}

/// The rendered guide: `(lang, category or "" for the list)` -> page.
#[derive(Debug)]
pub struct Guide {
    pages: HashMap<(&'static str, String), Page>,
}

#[derive(Debug)]
struct Page {
    body: bytes::Bytes,
    etag: HeaderValue,
}

impl Guide {
    /// Renders every page of `rules`. The `unknown` rule is for scans that
    /// saw nothing; it names no waste, so the guide leaves it out.
    pub fn build(rules: &Rules) -> Self {
        let mut pages = HashMap::new();
        let shown: Vec<_> = rules
            .iter()
            .filter(|r| r.category != bus::rules::UNKNOWN)
            .collect();
        for lang in LANGS {
            let pick = |l: &bus::wire::Localized| {
                if lang == "ko" {
                    l.ko.clone()
                } else {
                    l.en.clone()
                }
            };
            let list = GuideList {
                lang,
                categories: shown
                    .iter()
                    .map(|r| GuideEntry {
                        category: r.category.clone(),
                        name: pick(&r.name),
                        bin: pick(&r.bin),
                        items: [&r.items.ko[..], &r.items.en[..]].concat(),
                    })
                    .collect(),
            };
            pages.insert((lang, String::new()), Page::new(&list));
            for r in &shown {
                let rule = GuideRule {
                    lang,
                    category: r.category.clone(),
                    name: pick(&r.name),
                    bin: pick(&r.bin),
                    steps: r.steps.iter().map(pick).collect(),
                    why: pick(&r.why),
                    items: if lang == "ko" {
                        r.items.ko.clone()
                    } else {
                        r.items.en.clone()
                    },
                };
                pages.insert((lang, r.category.clone()), Page::new(&rule));
            }
        }
        Self { pages }
    }
}

impl Page {
    fn new(value: &impl Serialize) -> Self {
        let body = serde_json::to_vec(value).expect("guide pages serialize");
        let hash = Sha256::digest(&body);
        let hex: String = hash[..16].iter().map(|b| format!("{b:02x}")).collect();
        Self {
            etag: HeaderValue::from_str(&format!("\"{hex}\"")).expect("hex is a valid header"),
            body: body.into(),
        }
    }
}

/// Query of the guide's routes.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LangQuery {
    /// `ko` (default) or `en`.
    #[param(pattern = "^(ko|en)$")]
    lang: Option<String>,
}

/// `GET /v1/guide?lang=`: the categories with their bins.
#[utoipa::path(get, path = "/v1/guide", operation_id = "listGuide", tag = "guide", security(()),
    params(LangQuery, ("If-None-Match" = Option<String>, Header, description = "A tag from an earlier answer: 304 while it is current")),
    responses(
        (status = 200, description = "Every category with its bin; `ETag` and `Cache-Control` set", body = GuideList),
        (status = 304, description = "The `If-None-Match` tag is current"),
        (status = 400, description = "`invalid_lang`", body = ErrorBody),
    ))]
pub async fn list(
    State(guide): State<Arc<Guide>>,
    query: Result<Query<LangQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    serve(&guide, query, String::new(), &headers)
}

/// `GET /v1/guide/{category}?lang=`: one rule.
#[utoipa::path(get, path = "/v1/guide/{category}", operation_id = "getGuideRule", tag = "guide", security(()),
    params(("category" = String, Path, description = "A category `GET /v1/guide` lists"), LangQuery,
        ("If-None-Match" = Option<String>, Header, description = "A tag from an earlier answer: 304 while it is current")),
    responses(
        (status = 200, description = "The rule: bin, steps, why, items; `ETag` and `Cache-Control` set", body = GuideRule),
        (status = 304, description = "The `If-None-Match` tag is current"),
        (status = 400, description = "`invalid_lang`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such category", body = ErrorBody),
    ))]
pub async fn rule(
    State(guide): State<Arc<Guide>>,
    Path(category): Path<String>,
    query: Result<Query<LangQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    serve(&guide, query, category, &headers)
}

fn serve(
    guide: &Guide,
    query: Result<Query<LangQuery>, QueryRejection>,
    category: String,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let bad = || ApiError::BadRequest {
        code: "invalid_lang",
        message: "lang must be ko or en, at most once".into(),
    };
    let Ok(Query(query)) = query else {
        return Err(bad());
    };
    let lang = match query.lang.as_deref() {
        // Korean is the product's first language (the rules are Korea's).
        None => "ko",
        Some(lang) => LANGS.into_iter().find(|l| *l == lang).ok_or_else(bad)?,
    };
    let page = guide.pages.get(&(lang, category)).ok_or_else(|| {
        ApiError::NotFound("no such category in the guide; GET /v1/guide lists them".into())
    })?;
    let cache = [
        (header::ETAG, page.etag.clone()),
        (
            header::CACHE_CONTROL,
            HeaderValue::from_static(CACHE_CONTROL),
        ),
    ];
    if matches(headers, &page.etag) {
        return Ok((StatusCode::NOT_MODIFIED, cache).into_response());
    }
    let json = [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    )];
    Ok((cache, json, page.body.clone()).into_response())
}

/// `If-None-Match` names the page's tag (or `*`); weak tags compare by
/// their opaque part, as RFC 9110's weak comparison for GET requires.
fn matches(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let ours = etag.to_str().unwrap_or_default();
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || t == ours)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt as _;

    fn app() -> axum::Router {
        axum::Router::new()
            .route("/v1/guide", axum::routing::get(list))
            .route("/v1/guide/{category}", axum::routing::get(rule))
            .with_state(Arc::new(Guide::build(&Rules::built_in().unwrap())))
    }

    async fn get(
        app: &axum::Router,
        uri: &str,
        etag: Option<&str>,
    ) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut request = axum::http::Request::get(uri);
        if let Some(etag) = etag {
            request = request.header(header::IF_NONE_MATCH, etag);
        }
        let response = app
            .clone()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, headers, body.to_vec())
    }

    #[tokio::test]
    async fn the_guide_lists_and_explains_in_both_languages() {
        let app = app();
        let (status, headers, body) = get(&app, "/v1/guide?lang=en", None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            headers[header::CACHE_CONTROL]
                .to_str()
                .unwrap()
                .starts_with("public, max-age=")
        );
        let list: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let glass = list["categories"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["category"] == "glass")
            .unwrap();
        assert!(glass["bin"].as_str().unwrap().contains("Glass bottle bin"));
        assert!(!list["categories"].to_string().contains("\"unknown\""));

        let (status, _, body) = get(&app, "/v1/guide/glass?lang=ko", None).await;
        assert_eq!(status, StatusCode::OK);
        let rule: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            rule["bin"],
            "유리병 수거함 (보증금 대상 병은 소매점에 반환)"
        );
        assert!(
            rule["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i == "소주병")
        );
        assert!(!rule["steps"].as_array().unwrap().is_empty());
        assert!(rule["why"].as_str().unwrap().contains("병"));
        let (_, _, en) = get(&app, "/v1/guide/glass?lang=en", None).await;
        let en: serde_json::Value = serde_json::from_slice(&en).unwrap();
        assert!(
            en["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i == "soju bottle")
        );
    }

    #[tokio::test]
    async fn unknown_categories_and_languages_get_json_errors() {
        let app = app();
        let (status, _, body) = get(&app, "/v1/guide/spaceship?lang=en", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(error["error"]["code"], "not_found");
        let (status, _, body) = get(&app, "/v1/guide?lang=fr", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(error["error"]["code"], "invalid_lang");
    }

    #[tokio::test]
    async fn a_client_with_the_current_etag_gets_304() {
        let app = app();
        let (_, headers, body) = get(&app, "/v1/guide/battery?lang=en", None).await;
        let etag = headers[header::ETAG].to_str().unwrap().to_owned();
        assert!(
            etag.starts_with('"') && !etag.starts_with("W/"),
            "strong: {etag}"
        );
        let (status, headers, empty) = get(&app, "/v1/guide/battery?lang=en", Some(&etag)).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        assert_eq!(headers[header::ETAG], etag.as_str());
        assert!(empty.is_empty());
        let (status, _, again) = get(&app, "/v1/guide/battery?lang=en", Some("\"stale\"")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(again, body);
        let (_, ko, _) = get(&app, "/v1/guide/battery?lang=ko", None).await;
        assert_ne!(
            ko[header::ETAG],
            etag.as_str(),
            "each language has its own tag"
        );
    }
}
