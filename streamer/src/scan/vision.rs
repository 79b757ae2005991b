//! The vision stage: the image model's category, bounded by a soft timeout
//! (a "taking longer" notice) and a hard one, retried with backoff.

use super::*;

impl ScanWorker {
    pub(super) async fn classify(
        &self,
        image: &PreparedImage,
        events: &mut Events,
    ) -> Result<Classification, Stop> {
        let s = &self.settings;
        let mut last_error = String::new();
        for attempt in 0..s.max_attempts {
            if attempt > 0 {
                tokio::time::sleep(retry_delay(s.retry_base, attempt)).await;
            }
            let started = tokio::time::Instant::now();
            let mut call = self.vision.classify(image);
            let outcome = tokio::select! {
                outcome = &mut call => Some(outcome),
                _ = tokio::time::sleep(s.vision_soft) => None,
            };
            let outcome = match outcome {
                Some(outcome) => Some(outcome),
                None => {
                    events
                        .notice(
                            ScanStage::Vision,
                            50,
                            "Still looking; this takes longer than usual.".into(),
                        )
                        .await?;
                    let left = s.vision_hard.saturating_sub(started.elapsed());
                    tokio::time::timeout(left, call).await.ok()
                }
            };
            metrics::histogram!("streamer_scan_vision_seconds")
                .record(started.elapsed().as_secs_f64());
            // The provider's own words (its URL, its body) go to the log;
            // the event, the record and the dead letter get a plain cause.
            let (code, detail, public, retryable) = match outcome {
                Some(Ok(seen)) => return Ok(seen),
                Some(Err(e)) => (
                    e.code,
                    e.message.clone(),
                    e.public_message().to_owned(),
                    e.retryable,
                ),
                None => {
                    let timeout = format!("no answer within {:?}", s.vision_hard);
                    ("upstream_timeout", timeout.clone(), timeout, true)
                }
            };
            metrics::counter!("streamer_scan_vision_errors_total", "code" => code).increment(1);
            tracing::warn!(attempt, code, error = %detail, "Vision attempt failed.");
            if !retryable {
                return Err(Stop::Failed(Failure {
                    code: "vision_failed",
                    message: public,
                    stage: ScanStage::Vision,
                    dead_letter: true,
                }));
            }
            last_error = public;
            metrics::counter!("streamer_scan_retries_total", "stage" => "vision").increment(1);
        }
        Err(Stop::Failed(Failure {
            code: "vision_failed",
            message: format!(
                "the image model failed {} times; last: {last_error}",
                s.max_attempts
            ),
            stage: ScanStage::Vision,
            dead_letter: true,
        }))
    }
}
