//! The scan consumer: one `scan.req.*` delivery in, its outcome stored
//! (the `result` or `error` event, the record on `scan.done.*`, a dead
//! letter for a failure worth retrying) and only then the ack.

use tracing::Instrument as _;

use super::*;

impl ScanWorker {
    /// Handles one delivery of a `scan.req.*` message, acking it once the
    /// scan's outcome is stored, or handing it back when the bus failed.
    pub async fn handle(&self, message: jetstream::Message) {
        let lease = bus::lease::Lease::keep(&self.client, &message, self.settings.progress_every);
        let deliveries = bus::dlq::deliveries(&message);
        let request: ScanRequest = match serde_json::from_slice(&message.payload) {
            Ok(r) => r,
            Err(e) => {
                let reason = format!("undecodable scan request: {e}");
                bus::dlq::terminate(&self.js, DLQ_KIND, &message, &reason).await;
                return;
            }
        };
        // The scan id names subjects; the user id is a JWT `sub` (any
        // non-empty string) that is only stored and compared.
        if subject::token(&request.scan_id).is_err() || request.user_id.is_empty() {
            let reason = "scan request with an invalid id";
            bus::dlq::terminate(&self.js, DLQ_KIND, &message, reason).await;
            return;
        }
        let span = tracing::info_span!("scan", scan = %request.scan_id, run = request.reprocessed);
        // Instrumented, not entered: a guard held across awaits lends the
        // span to whatever else runs on this thread meanwhile.
        self.handle_valid(message, request, lease, deliveries)
            .instrument(span)
            .await;
    }

    async fn handle_valid(
        &self,
        message: jetstream::Message,
        request: ScanRequest,
        lease: bus::lease::Lease,
        deliveries: u64,
    ) {
        let outcome = AssertUnwindSafe(self.run(&request)).catch_unwind().await;
        drop(lease);
        let outcome = match outcome {
            Ok(o) => o,
            Err(_) => {
                // A panic in a stage (a decoder bug on a hostile file, say)
                // must not be redelivered until max_deliver: fail it once.
                metrics::counter!("streamer_scan_panics_total").increment(1);
                tracing::error!("The scan pipeline panicked; failing the scan.");
                self.finish_failed(
                    &request,
                    None,
                    Failure {
                        code: "internal",
                        message: "the pipeline failed unexpectedly".into(),
                        stage: ScanStage::Done,
                        dead_letter: true,
                    },
                    deliveries,
                )
                .await
            }
        };
        match outcome {
            Ok(()) => {
                if let Err(error) = message.double_ack().await {
                    tracing::warn!(%error, "Ack of a finished scan failed; it will be redelivered and found finished.");
                }
            }
            Err(Stop::Superseded) => {
                tracing::warn!("Another worker is writing this scan; leaving it to them.");
            }
            Err(Stop::Bus(error)) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "Scan failed on the bus; handing it back."
                );
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
            Err(Stop::Failed(_)) => unreachable!("failures are finished inside run"),
        }
    }

    /// Closes a scan whose job used up its deliveries (the advisory of its
    /// stream sequence `stream_seq`): its `error` event, the failed record
    /// and a dead letter on `dlq.scan` (reprocessable). A scan whose run
    /// already ended is only finished again.
    ///
    /// # Errors
    /// When the bus fails; the advisory is then handed back and retried.
    pub async fn close_exhausted(&self, stream_seq: u64, deliveries: u64) -> anyhow::Result<()> {
        let Some(request) =
            crate::chat::original::<ScanRequest>(&self.js, bus::streams::SCAN_REQ, stream_seq)
                .await?
        else {
            return Ok(());
        };
        let span = tracing::info_span!("scan", scan = %request.scan_id, run = request.reprocessed);
        self.close_exhausted_scan(&request, deliveries)
            .instrument(span)
            .await
    }

    async fn close_exhausted_scan(
        &self,
        request: &ScanRequest,
        deliveries: u64,
    ) -> anyhow::Result<()> {
        let failure = Failure {
            code: crate::chat::EXHAUSTED_CODE,
            message: "the scan could not be completed after several attempts; please try again"
                .into(),
            stage: ScanStage::Done,
            dead_letter: true,
        };
        // A worker still writing (slow, not dead) is fenced by our event; if
        // it wrote between our read and our write, read again.
        for _ in 0..5 {
            let closed = match Events::open(&self.js, request).await? {
                Opened::Finished(last) => self.refinish(request, last).await,
                Opened::Fresh(mut events) => {
                    self.finish_failed(request, Some(&mut events), failure.clone(), deliveries)
                        .await
                }
            };
            match closed {
                Ok(()) => {
                    metrics::counter!("streamer_exhausted_total", "kind" => "scan").increment(1);
                    return Ok(());
                }
                Err(Stop::Superseded) => continue,
                Err(Stop::Bus(e)) => return Err(e),
                Err(Stop::Failed(_)) => unreachable!("finish_failed does not fail a scan"),
            }
        }
        anyhow::bail!("another worker kept writing the scan")
    }

    pub(super) async fn run(&self, request: &ScanRequest) -> Result<(), Stop> {
        let mut events = match Events::open(&self.js, request).await? {
            Opened::Finished(last) => return self.refinish(request, last).await,
            Opened::Fresh(events) => events,
        };
        match self.pipeline(request, &mut events).await {
            Ok(record) => {
                self.publish_done(&record, request.reprocessed).await?;
                if !record.cached {
                    self.remember(&record, &request.lang).await;
                }
                metrics::counter!("streamer_scans_total", "status" => "done", "cached" => record.cached.to_string())
                    .increment(1);
                Ok(())
            }
            Err(Stop::Failed(failure)) => {
                let attempts = u64::from(self.settings.max_attempts);
                self.finish_failed(request, Some(&mut events), failure, attempts)
                    .await
            }
            Err(other) => Err(other),
        }
    }

    /// The run already ended (its terminal event is stored) but the job was
    /// not acked: make sure the record and dead letter are out, then ack.
    pub(super) async fn refinish(
        &self,
        request: &ScanRequest,
        last: ScanEvent,
    ) -> Result<(), Stop> {
        match last.data {
            ScanEventData::Result(record) => self.publish_done(&record, request.reprocessed).await,
            ScanEventData::Error(error) => {
                let failure = Failure::from_event(error);
                let record = failed_record(request, &failure);
                self.publish_done(&record, request.reprocessed).await?;
                if failure.dead_letter {
                    self.dead_letter(request, &failure, u64::from(self.settings.max_attempts))
                        .await?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    pub(super) async fn finish_failed(
        &self,
        request: &ScanRequest,
        events: Option<&mut Events>,
        failure: Failure,
        attempts: u64,
    ) -> Result<(), Stop> {
        tracing::warn!(code = failure.code, error = %failure.message, "Scan failed.");
        metrics::counter!("streamer_scans_total", "status" => "failed", "cached" => "false")
            .increment(1);
        let error = ScanEventData::Error(ScanError {
            code: failure.code.into(),
            message: failure.message.clone(),
            stage: Some(failure.stage),
        });
        match events {
            Some(events) => events.emit(error).await?,
            None => {
                let mut events = match Events::open(&self.js, request).await? {
                    Opened::Finished(_) => return Ok(()),
                    Opened::Fresh(events) => events,
                };
                events.emit(error).await?;
            }
        }
        let record = failed_record(request, &failure);
        self.publish_done(&record, request.reprocessed).await?;
        if failure.dead_letter {
            self.dead_letter(request, &failure, attempts).await?;
        }
        Ok(())
    }

    pub(super) async fn publish_done(&self, record: &ScanRecord, run: u32) -> Result<(), Stop> {
        let subject = subject::scan_done(&record.scan_id).context("scan id")?;
        let publish = jetstream::message::PublishMessage::build()
            .payload(
                serde_json::to_vec(record)
                    .expect("record serialises")
                    .into(),
            )
            .message_id(format!("{}:{run}", record.scan_id));
        self.js
            .send_publish(subject, publish)
            .await
            .context("publishing the scan record")?
            .await
            .context("publishing the scan record")?;
        Ok(())
    }

    pub(super) async fn dead_letter(
        &self,
        request: &ScanRequest,
        failure: &Failure,
        attempts: u64,
    ) -> Result<(), Stop> {
        let letter = DeadLetter {
            subject: subject::scan_req(&request.scan_id).context("scan id")?,
            error: format!("{}: {}", failure.code, failure.message),
            deliveries: attempts,
            payload: serde_json::to_string(request).expect("request serialises"),
            failed_at: Utc::now(),
        };
        let publish = jetstream::message::PublishMessage::build()
            .payload(
                serde_json::to_vec(&letter)
                    .expect("letter serialises")
                    .into(),
            )
            .message_id(format!("dlq:{}:{}", request.scan_id, request.reprocessed));
        self.js
            .send_publish(subject::dlq(DLQ_KIND).expect("static kind"), publish)
            .await
            .context("publishing the dead letter")?
            .await
            .context("publishing the dead letter")?;
        metrics::counter!("streamer_scan_dead_letters_total").increment(1);
        Ok(())
    }
}
