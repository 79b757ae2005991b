//! A scan's event stream as one worker writes it: ids contiguous across
//! every worker that touched the scan, each event fenced on the subject's
//! last sequence so two workers cannot interleave.

use super::*;

/// The header naming which run (0, then one more per DLQ reprocess) wrote an event.
const RUN_HEADER: &str = "Scan-Run";

/// The scan's event stream as this worker writes it.
pub(super) struct Events {
    pub(super) js: jetstream::Context,
    pub(super) subject: String,
    pub(super) run: u32,
    pub(super) next_id: u64,
    /// Stream sequence of the subject's last message (0: none yet).
    pub(super) last_seq: u64,
    /// Progress at or below this was reported by an earlier delivery of this run.
    pub(super) floor: u8,
    /// True when earlier events exist, so the explanation must start with a reset.
    pub(super) has_history: bool,
}

/// The last stored event, if it ended this very run.
#[allow(clippy::large_enum_variant)] // one per job, short-lived
pub(super) enum Opened {
    Fresh(Events),
    Finished(ScanEvent),
}

impl Events {
    pub(super) async fn open(
        js: &jetstream::Context,
        request: &ScanRequest,
    ) -> anyhow::Result<Opened> {
        let subject = subject::scan_evt(&request.scan_id)?;
        let stream = js.get_stream(bus::streams::SCAN_EVT).await?;
        let mut events = Self {
            js: js.clone(),
            subject: subject.clone(),
            run: request.reprocessed,
            next_id: 1,
            last_seq: 0,
            floor: 0,
            has_history: false,
        };
        let last = match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => m,
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(Opened::Fresh(events));
            }
            Err(e) => return Err(e.into()),
        };
        let event: ScanEvent = serde_json::from_slice(&last.payload)
            .with_context(|| format!("undecodable event on {subject}"))?;
        let run = last
            .headers
            .get(RUN_HEADER)
            .and_then(|v| v.as_str().parse::<u32>().ok())
            .unwrap_or(0);
        events.next_id = event.id + 1;
        events.last_seq = last.sequence;
        events.has_history = true;
        if run == request.reprocessed {
            if event.data.is_terminal() {
                return Ok(Opened::Finished(event));
            }
            events.floor = match &event.data {
                ScanEventData::Progress(p) => p.percent,
                _ => 80,
            };
        }
        Ok(Opened::Fresh(events))
    }

    pub(super) async fn emit(&mut self, data: ScanEventData) -> Result<(), Stop> {
        let event = ScanEvent {
            id: self.next_id,
            data,
        };
        let mut headers = HeaderMap::new();
        headers.insert(RUN_HEADER, self.run.to_string().as_str());
        let body = serde_json::to_vec(&event).expect("event serialises");
        let publish = jetstream::message::PublishMessage::build()
            .payload(body.clone().into())
            .headers(headers)
            .expected_last_subject_sequence(self.last_seq);
        let ack = self
            .js
            .send_publish(self.subject.clone(), publish)
            .await
            .context("publishing a scan event")?
            .await;
        let landed = match ack {
            Ok(ack) => ack.sequence,
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                return Err(Stop::Superseded);
            }
            // The outcome is unknown (the ack was lost, perhaps because this
            // process was frozen): a nak now could hand the scan to a third
            // worker while another writes it.
            Err(e) => match bus::fence::settle(
                &self.js,
                bus::streams::SCAN_EVT,
                &self.subject,
                self.last_seq,
                &body,
            )
            .await
            {
                bus::fence::Settled::Landed(sequence) => sequence,
                bus::fence::Settled::Fenced => return Err(Stop::Superseded),
                bus::fence::Settled::Unknown => {
                    return Err(Stop::Bus(
                        anyhow::Error::new(e).context("publishing a scan event"),
                    ));
                }
            },
        };
        self.last_seq = landed;
        self.next_id += 1;
        Ok(())
    }

    pub(super) async fn progress(
        &mut self,
        stage: ScanStage,
        percent: u8,
        message: String,
    ) -> Result<(), Stop> {
        if percent <= self.floor {
            return Ok(());
        }
        self.emit(ScanEventData::Progress(ScanProgress {
            stage,
            percent,
            message,
            reset: false,
        }))
        .await
    }

    /// A notice that does not move the bar (a soft timeout).
    pub(super) async fn notice(
        &mut self,
        stage: ScanStage,
        percent: u8,
        message: String,
    ) -> Result<(), Stop> {
        self.emit(ScanEventData::Progress(ScanProgress {
            stage,
            percent,
            message,
            reset: false,
        }))
        .await
    }
}
