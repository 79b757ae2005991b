//! Why a scan stopped: the bus failed, another worker took over, or the
//! scan failed for good (and the failed record it then gets).

use super::*;

/// Why a stage stopped the pipeline.
#[derive(Debug)]
pub(super) enum Stop {
    /// The bus failed: hand the job back, it is redone from the stored events.
    Bus(anyhow::Error),
    /// Another worker is writing this scan's events.
    Superseded,
    /// The scan failed for good.
    Failed(Failure),
}

impl From<anyhow::Error> for Stop {
    fn from(e: anyhow::Error) -> Self {
        Self::Bus(e)
    }
}

/// A terminal failure of one scan.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    pub(super) code: &'static str,
    pub(super) message: String,
    pub(super) stage: ScanStage,
    /// Worth a dead letter: retrying later might succeed (a provider was
    /// down), unlike a corrupt image.
    pub(super) dead_letter: bool,
}

impl Failure {
    pub(super) fn input(code: &'static str, message: String, stage: ScanStage) -> Self {
        Self {
            code,
            message,
            stage,
            dead_letter: false,
        }
    }
}

impl Failure {
    /// The failure an `error` event recorded, for finishing a run whose
    /// error event is stored but whose record or dead letter may not be.
    pub(super) fn from_event(error: ScanError) -> Self {
        let (code, dead_letter) = match error.code.as_str() {
            "corrupt_image" => ("corrupt_image", false),
            "image_missing" => ("image_missing", false),
            "vision_failed" => ("vision_failed", true),
            "answer_failed" => ("answer_failed", true),
            crate::chat::EXHAUSTED_CODE => (crate::chat::EXHAUSTED_CODE, true),
            _ => ("internal", true),
        };
        Self {
            code,
            message: error.message,
            stage: error.stage.unwrap_or(ScanStage::Done),
            dead_letter,
        }
    }
}

pub(super) fn failed_record(request: &ScanRequest, failure: &Failure) -> ScanRecord {
    ScanRecord {
        scan_id: request.scan_id.clone(),
        user_id: request.user_id.clone(),
        status: ScanStatus::Failed,
        category: None,
        confidence: None,
        labels: Vec::new(),
        vision_model: None,
        phash: None,
        sha256: None,
        rule: None,
        answer: None,
        cached: false,
        reward: None,
        error: Some(format!("{}: {}", failure.code, failure.message)),
        created_at: request.created_at,
        completed_at: Some(Utc::now()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_error_event_finishes_with_its_own_code() {
        let event = |code: &str| ScanError {
            code: code.into(),
            message: "m".into(),
            stage: Some(ScanStage::Vision),
        };
        let vision = Failure::from_event(event("vision_failed"));
        assert_eq!((vision.code, vision.dead_letter), ("vision_failed", true));
        let corrupt = Failure::from_event(event("corrupt_image"));
        assert_eq!(
            (corrupt.code, corrupt.dead_letter),
            ("corrupt_image", false)
        );
        assert_eq!(Failure::from_event(event("???")).code, "internal");
    }
}
