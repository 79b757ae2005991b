//! Sending failed scans from `dlq.scan` back to the pipeline, a bounded
//! number of times.

use super::*;

/// What one DLQ pass did.
#[derive(Debug, Default, serde::Serialize)]
pub struct ReprocessReport {
    /// Scans sent back to the pipeline.
    pub requeued: Vec<String>,
    /// Scans archived after [`MAX_REPROCESS`] passes.
    pub archived: Vec<String>,
    /// Dead letters that could not be read (kept, terminated).
    pub unreadable: usize,
}

/// Sends at most `limit` failed scans from `dlq.scan` back to the pipeline
/// (one more `reprocessed`), archiving those already reprocessed
/// [`MAX_REPROCESS`] times on `dlq.scan_archive`.
///
/// # Errors
/// When the DLQ consumer cannot be read or a publish fails (the letter then
/// stays for the next pass).
pub async fn reprocess_dead_letters(
    js: &jetstream::Context,
    limit: usize,
) -> anyhow::Result<ReprocessReport> {
    let consumer = bus::streams::STREAMER_DLQ_SCAN.ensure(js).await?;
    let mut batch = consumer
        .fetch()
        .max_messages(limit.max(1))
        .expires(Duration::from_millis(500))
        .messages()
        .await
        .context("cannot read the DLQ")?;
    let mut report = ReprocessReport::default();
    while let Some(message) = batch.next().await {
        let message = message.map_err(|e| anyhow::anyhow!(e))?;
        let parsed = serde_json::from_slice::<DeadLetter>(&message.payload)
            .ok()
            .and_then(|l| Some((serde_json::from_str::<ScanRequest>(&l.payload).ok()?, l)));
        let Some((mut request, letter)) = parsed else {
            report.unreadable += 1;
            let _ = message.ack_with(AckKind::Term).await;
            continue;
        };
        if request.reprocessed >= MAX_REPROCESS {
            let archived = DeadLetter {
                error: format!(
                    "archived after {MAX_REPROCESS} reprocess passes; last: {}",
                    letter.error
                ),
                failed_at: Utc::now(),
                ..letter
            };
            js.publish(
                subject::dlq(DLQ_ARCHIVE_KIND).expect("static kind"),
                serde_json::to_vec(&archived)?.into(),
            )
            .await?
            .await?;
            report.archived.push(request.scan_id);
        } else {
            request.reprocessed += 1;
            let publish = jetstream::message::PublishMessage::build()
                .payload(serde_json::to_vec(&request)?.into())
                .message_id(format!("{}:r{}", request.scan_id, request.reprocessed));
            js.send_publish(subject::scan_req(&request.scan_id)?, publish)
                .await?
                .await?;
            report.requeued.push(request.scan_id);
        }
        message.double_ack().await.map_err(|e| anyhow::anyhow!(e))?;
    }
    Ok(report)
}
