//! Vision: turns a prepared image into waste-category evidence.
//!
//! One trait, two providers: [`local`] runs EfficientNet-Lite0 in-process
//! (the embedded default) and [`openai`] asks an OpenAI-compatible vision
//! model. The pipeline only sees [`Vision`] and [`Classification`].

pub mod local;
pub mod openai;
pub mod waste;

use std::{future::Future, pin::Pin, sync::Arc};

use bus::wire::ScanLabel;

/// The image the pipeline hands to a provider: decoded, EXIF-oriented and at
/// most 1024 px on its long side, plus the same image re-encoded as JPEG
/// for providers that take bytes.
#[derive(Clone)]
pub struct PreparedImage {
    /// Decoded RGB pixels.
    pub rgb: Arc<image::RgbImage>,
    /// The same image as JPEG, for providers that take bytes ([`Vision::wants_jpeg`]);
    /// empty otherwise.
    pub jpeg: bytes::Bytes,
}

/// What a provider saw.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    /// The waste category (a key of the rules file), `unknown` when the
    /// confidence is below the provider's threshold.
    pub category: String,
    /// Confidence in `category`, 0-1.
    pub confidence: f64,
    /// The model's top classes, best first (at most 5).
    pub labels: Vec<ScanLabel>,
    /// Provider and model, for the record (`local:efficientnet-lite0`, ...).
    pub model: String,
}

/// Why a provider gave no answer. `retryable` tells the pipeline whether
/// another attempt can help (a timeout or a 5xx) or not (a corrupt model).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct VisionError {
    /// What went wrong, for the logs only: a remote provider's text may
    /// hold its URL or an echo of a key.
    pub message: String,
    /// A stable code, as [`crate::upstream::UpstreamError::code`] for a
    /// remote provider, `vision_internal` for the local model.
    pub code: &'static str,
    /// True when retrying may succeed.
    pub retryable: bool,
}

impl VisionError {
    /// What a client may be told: a plain sentence per [`Self::code`].
    pub fn public_message(&self) -> &'static str {
        match self.code {
            "upstream_rate_limited" => "the image model provider is busy; try again shortly",
            "upstream_timeout" => "the image model provider did not answer in time",
            "upstream_rejected" => "the image model provider refused the request",
            "upstream_interrupted" => "the image model provider's answer was unreadable",
            "upstream_unavailable" => "the image model provider is unavailable",
            _ => "the image model failed",
        }
    }
}

/// A boxed future, so the trait stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An image classifier for the scan pipeline.
pub trait Vision: Send + Sync {
    /// Classifies one image into a waste category.
    fn classify<'a>(
        &'a self,
        image: &'a PreparedImage,
    ) -> BoxFuture<'a, Result<Classification, VisionError>>;

    /// Provider and model name, for logs and the record.
    fn name(&self) -> String;

    /// True when the provider reads [`PreparedImage::jpeg`], so the
    /// pipeline encodes it.
    fn wants_jpeg(&self) -> bool {
        true
    }
}
