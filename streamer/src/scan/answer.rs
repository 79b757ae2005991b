//! The answer stage: the LLM's explanation streamed as `token` events,
//! restarted with a `reset` progress after an earlier attempt or worker.

use super::*;

impl ScanWorker {
    pub(super) async fn explain(
        &self,
        request: &ScanRequest,
        seen: &Classification,
        rule: &DisposalRule,
        related: &[DisposalRule],
        events: &mut Events,
    ) -> Result<String, Stop> {
        let s = &self.settings;
        let prompt = upstream::Request {
            messages: answer_prompt(seen, rule, related, &request.lang),
            model: None,
            max_tokens: s.max_tokens,
            temperature: Some(0.3),
        };
        let mut last_error = String::new();
        for attempt in 0..s.max_attempts {
            if attempt > 0 {
                tokio::time::sleep(retry_delay(s.retry_base, attempt)).await;
            }
            // Earlier events may hold explanation text (a dead worker, an
            // earlier attempt, an earlier run): clients drop it on reset.
            let reset = events.has_history || attempt > 0;
            events
                .emit(ScanEventData::Progress(ScanProgress {
                    stage: ScanStage::Answer,
                    percent: 80,
                    message: if reset {
                        "Writing the explanation again.".into()
                    } else {
                        "Writing the explanation.".into()
                    },
                    reset,
                }))
                .await?;
            events.has_history = true;
            match self.stream_answer(&prompt, events).await {
                Ok(text) if !text.trim().is_empty() => return Ok(text),
                Ok(_) => last_error = "the model wrote nothing".into(),
                Err(Stop::Failed(f)) => last_error = f.message,
                Err(other) => return Err(other),
            }
            metrics::counter!("streamer_scan_retries_total", "stage" => "answer").increment(1);
            tracing::warn!(attempt, error = %last_error, "Answer attempt failed.");
        }
        Err(Stop::Failed(Failure {
            code: "answer_failed",
            message: format!(
                "the language model failed {} times; last: {last_error}",
                s.max_attempts
            ),
            stage: ScanStage::Answer,
            dead_letter: true,
        }))
    }

    /// One attempt at the explanation; `Failed` means retry.
    pub(super) async fn stream_answer(
        &self,
        prompt: &upstream::Request,
        events: &mut Events,
    ) -> Result<String, Stop> {
        let s = &self.settings;
        let failed = |message: String| {
            Stop::Failed(Failure {
                code: "answer_failed",
                message,
                stage: ScanStage::Answer,
                dead_letter: true,
            })
        };
        let hard = tokio::time::sleep(s.answer_hard);
        let soft = tokio::time::sleep(s.answer_soft);
        tokio::pin!(hard, soft);
        let mut soft_sent = false;
        // The provider's own words (its URL, its body) go to the log; the
        // event, the record and the dead letter get a plain cause.
        let upstream_failed = |e: upstream::UpstreamError| {
            tracing::warn!(code = e.code(), error = %e, "The explanation's LLM call failed.");
            failed(e.public_message().to_owned())
        };
        let open = self.upstream.stream(prompt);
        let mut stream = tokio::select! {
            opened = open => opened.map_err(upstream_failed)?,
            _ = &mut hard => return Err(failed(format!("no answer within {:?}", s.answer_hard))),
        };
        let mut text = String::new();
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
                _ = &mut hard => return Err(failed(format!("the answer took longer than {:?}", s.answer_hard))),
                _ = &mut soft, if !soft_sent => {
                    soft_sent = true;
                    events.notice(ScanStage::Answer, 80, "Still writing; this takes longer than usual.".into()).await?;
                    continue;
                }
            };
            match next {
                None => return Ok(text),
                Some(Ok(upstream::Event::Delta(delta))) => {
                    text.push_str(&delta);
                    events.emit(ScanEventData::Token { delta }).await?;
                }
                Some(Ok(upstream::Event::Finish(_))) => {}
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(upstream_failed(e)),
            }
        }
    }
}

pub(super) fn answer_prompt(
    seen: &Classification,
    rule: &DisposalRule,
    related: &[DisposalRule],
    lang: &str,
) -> Vec<ChatMessage> {
    let language = if lang == "ko" { "Korean" } else { "English" };
    let steps: Vec<String> = rule
        .steps
        .iter()
        .map(|s| format!("- {}", localized(s, lang)))
        .collect();
    let seen_as: Vec<String> = seen
        .labels
        .iter()
        .map(|l| format!("{} ({:.0} %)", l.label, l.score * 100.0))
        .collect();
    let system = format!(
        "You are a recycling assistant in Korea. In {language}, in at most five short sentences, \
         tell the user how to dispose of the item and why, following the rule given. \
         If the category is unknown, say that the item was not recognised and what to check."
    );
    let mut user = format!(
        "Category: {} ({:.0} % confidence). The image model saw: {}.\nBin: {}\nSteps:\n{}\nWhy: {}",
        localized(&rule.name, lang),
        seen.confidence * 100.0,
        if seen_as.is_empty() {
            "-".into()
        } else {
            seen_as.join(", ")
        },
        localized(&rule.bin, lang),
        steps.join("\n"),
        localized(&rule.why, lang),
    );
    if !related.is_empty() {
        user.push_str(
            "\nThe image model's labels also match these rules; use one if it fits the item's material better:\n",
        );
        for (i, r) in related.iter().enumerate() {
            user.push_str(&crate::grounding::render(i + 2, r, lang));
        }
    }
    vec![
        ChatMessage {
            role: "system".into(),
            content: system,
        },
        ChatMessage {
            role: "user".into(),
            content: user,
        },
    ]
}
