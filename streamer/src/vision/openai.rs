//! The OpenAI-compatible vision provider: the prepared image goes as a JPEG
//! data URI in a chat completion, and the model answers with a JSON object
//! naming one of our categories. Models wrap JSON in prose or code fences
//! often enough that the first `{...}` of the reply is what is read.

use std::time::Duration;

use base64::Engine as _;
use bus::wire::ScanLabel;
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{BoxFuture, Classification, PreparedImage, Vision, VisionError};
use crate::rules::{CATEGORIES, UNKNOWN};

/// An OpenAI-compatible vision model.
pub struct OpenAiVision {
    http: reqwest::Client,
    url: String,
    model: String,
    api_key: Option<SecretString>,
    threshold: f64,
}

impl OpenAiVision {
    /// A provider at `base_url` (before `/chat/completions`).
    ///
    /// # Errors
    /// When the URL is not http(s) or the client cannot be built.
    pub fn new(
        base_url: &str,
        model: &str,
        api_key: Option<SecretString>,
        threshold: f64,
        connect_timeout: Duration,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            base_url.starts_with("http://") || base_url.starts_with("https://"),
            "VISION_BASE_URL {base_url:?} is not an http(s) URL"
        );
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .build()?;
        Ok(Self {
            http,
            url: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            model: model.to_owned(),
            api_key,
            threshold,
        })
    }

    fn request_body(&self, image: &PreparedImage) -> Value {
        let data = base64::engine::general_purpose::STANDARD.encode(&image.jpeg);
        let categories = CATEGORIES.join(", ");
        json!({
            "model": self.model,
            "temperature": 0,
            "max_tokens": 300,
            "messages": [
                {"role": "system", "content": format!(
                    "You identify a photographed household waste item for recycling in Korea. \
                     Answer with one JSON object only: {{\"category\": one of [{categories}], \
                     \"confidence\": a number from 0 to 1, \"labels\": [{{\"label\": what you see, \"score\": 0-1}}] (at most 5)}}. \
                     Use \"unknown\" when you cannot tell.")},
                {"role": "user", "content": [
                    {"type": "text", "text": "What waste item is this?"},
                    {"type": "image_url", "image_url": {"url": format!("data:image/jpeg;base64,{data}")}},
                ]},
            ],
        })
    }
}

#[derive(Debug, Deserialize)]
struct Answer {
    category: String,
    #[serde(default)]
    confidence: Option<f64>,
    #[serde(default)]
    labels: Vec<ScanLabel>,
}

/// Reads the model's reply text into a classification.
///
/// # Errors
/// When the reply holds no JSON object of the expected shape.
pub fn parse_answer(text: &str, threshold: f64) -> Result<(String, f64, Vec<ScanLabel>), String> {
    let start = text.find('{').ok_or("the reply holds no JSON object")?;
    let end = text.rfind('}').ok_or("the reply holds no JSON object")?;
    let answer: Answer = serde_json::from_str(&text[start..=end.max(start)])
        .map_err(|e| format!("the reply's JSON is not a classification: {e}"))?;
    let confidence = answer.confidence.unwrap_or(0.0).clamp(0.0, 1.0);
    let category = answer.category.trim().to_ascii_lowercase();
    let category = if CATEGORIES.contains(&category.as_str()) && confidence >= threshold {
        category
    } else {
        UNKNOWN.to_owned()
    };
    let mut labels = answer.labels;
    labels.truncate(5);
    Ok((category, confidence, labels))
}

impl Vision for OpenAiVision {
    fn classify<'a>(
        &'a self,
        image: &'a PreparedImage,
    ) -> BoxFuture<'a, Result<Classification, VisionError>> {
        Box::pin(async move {
            let mut request = self.http.post(&self.url).json(&self.request_body(image));
            if let Some(key) = &self.api_key {
                request = request.bearer_auth(key.expose_secret());
            }
            let response = request.send().await.map_err(|e| VisionError {
                message: format!("vision provider unreachable: {e}"),
                code: if e.is_timeout() {
                    "upstream_timeout"
                } else {
                    "upstream_unavailable"
                },
                retryable: true,
            })?;
            let status = response.status();
            if !status.is_success() {
                let body = response.text().await.unwrap_or_default();
                return Err(VisionError {
                    message: format!(
                        "vision provider answered HTTP {}: {}",
                        status.as_u16(),
                        body.chars().take(200).collect::<String>()
                    ),
                    code: crate::upstream::status_code(status.as_u16()),
                    retryable: status.as_u16() == 429 || status.is_server_error(),
                });
            }
            let unreadable = |message: String| VisionError {
                message,
                code: "upstream_interrupted",
                retryable: true,
            };
            let body: Value = response
                .json()
                .await
                .map_err(|e| unreadable(format!("vision provider sent unreadable JSON: {e}")))?;
            let text = body["choices"][0]["message"]["content"]
                .as_str()
                .ok_or_else(|| {
                    unreadable("vision provider's reply has no message content".into())
                })?;
            let (category, confidence, labels) =
                parse_answer(text, self.threshold).map_err(unreadable)?;
            Ok(Classification {
                category,
                confidence,
                labels,
                model: self.name(),
            })
        })
    }

    fn name(&self) -> String {
        format!("openai:{}", self.model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_json_wrapped_in_prose_and_applies_the_threshold() {
        let (c, p, l) = parse_answer(
            "Sure! ```json\n{\"category\":\"Glass\",\"confidence\":0.9,\"labels\":[{\"label\":\"wine bottle\",\"score\":0.8}]}\n```",
            0.25,
        )
        .unwrap();
        assert_eq!((c.as_str(), p, l.len()), ("glass", 0.9, 1));
        assert_eq!(
            parse_answer("{\"category\":\"glass\",\"confidence\":0.1}", 0.25)
                .unwrap()
                .0,
            "unknown"
        );
        assert_eq!(
            parse_answer("{\"category\":\"rocket\",\"confidence\":0.9}", 0.25)
                .unwrap()
                .0,
            "unknown"
        );
        assert!(parse_answer("I cannot help with that.", 0.25).is_err());
    }
}
