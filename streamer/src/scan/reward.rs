//! The reward stage (95 %): the character a scan earned, matched against
//! this streamer's cache of the catalogue (highest `priority` among the
//! characters of the scan's category), recorded as owned and granted on
//! `reward.grant.<scan>` for the persister.
//!
//! Whether the reward is `new` is decided from durable state, the
//! `character_owners` KV bucket, not from the persister's Postgres rows:
//! the streamer must answer within the scan, while Postgres may be down
//! for minutes and the persister writes in batches up to 5 s late. The
//! key `<user key>.<character id>` is created (create-only) with the scan
//! id as its value, so of two scans racing for the same character exactly
//! one creates it and is `new`. A scan that finds the key holding its own
//! id (a redelivery, a reprocessed run, a worker that died after the
//! create) is still the one that earned it: `new` again, the same answer.
//!
//! A scan grants once: the grant's `Nats-Msg-Id` is the scan id (the
//! stream drops a repeat within its 1-day duplicate window) and the
//! persister keeps one grant per scan id in Postgres, so a later repeat
//! changes nothing either.
//!
//! The stage is bounded by a soft timeout (a "taking longer" notice) and a
//! hard one, as the seeds' `character.match` (10 s / 15 s). On the hard
//! one the scan completes with `reward: null`, and a dead letter on
//! `dlq.scan` (published before the `result`, so no run ends without it)
//! sends the scan through the pipeline again on the next reprocess pass,
//! where the cached result makes it cheap and the reward is granted.

use async_nats::jetstream::kv::CreateErrorKind;
use bus::wire::{Reward, RewardGrant};

use super::*;

impl ScanWorker {
    /// Runs the reward stage for a scan of `category`.
    pub(super) async fn reward(
        &self,
        request: &ScanRequest,
        category: &str,
        events: &mut Events,
    ) -> Result<Option<Reward>, Stop> {
        let s = &self.settings;
        events
            .progress(ScanStage::Reward, 95, "Looking for a character.".into())
            .await?;
        let started = tokio::time::Instant::now();
        let mut grant = std::pin::pin!(self.grant(request, category));
        let outcome = tokio::select! {
            outcome = &mut grant => Some(outcome),
            _ = tokio::time::sleep(s.reward_soft) => None,
        };
        let outcome = match outcome {
            Some(outcome) => Some(outcome),
            None => {
                events
                    .notice(
                        ScanStage::Reward,
                        95,
                        "Still looking for a character; this takes longer than usual.".into(),
                    )
                    .await?;
                let left = s.reward_hard.saturating_sub(started.elapsed());
                tokio::time::timeout(left, grant).await.ok()
            }
        };
        metrics::histogram!("streamer_scan_reward_seconds").record(started.elapsed().as_secs_f64());
        match outcome {
            Some(Ok(reward)) => {
                let outcome = match &reward {
                    Some(r) if r.new => "new",
                    Some(_) => "repeat",
                    None => "none",
                };
                metrics::counter!("streamer_rewards_total", "outcome" => outcome).increment(1);
                Ok(reward)
            }
            Some(Err(error)) => Err(Stop::Bus(error.context("granting the reward"))),
            None => {
                metrics::counter!("streamer_rewards_total", "outcome" => "timeout").increment(1);
                tracing::warn!(
                    after = ?s.reward_hard,
                    "The reward stage timed out; completing without one and leaving a dead letter."
                );
                let failure = Failure {
                    code: "reward_timeout",
                    message: format!("no character granted within {:?}", s.reward_hard),
                    stage: ScanStage::Reward,
                    dead_letter: true,
                };
                self.dead_letter(request, &failure, 1).await?;
                Ok(None)
            }
        }
    }

    /// Matches, records ownership and publishes the grant; `None` when no
    /// character can be earned from `category`.
    async fn grant(&self, request: &ScanRequest, category: &str) -> anyhow::Result<Option<Reward>> {
        // Waits for the cache's first full refresh; the caller bounds it.
        let Some(character) = self.characters.best_for(category).await else {
            return Ok(None);
        };
        let key = format!(
            "{}.{}",
            subject::user_key(&request.user_id),
            character.character_id
        );
        let new = match self
            .owners
            .create(&key, request.scan_id.clone().into())
            .await
        {
            Ok(_) => true,
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
                let first = self
                    .owners
                    .get(&key)
                    .await
                    .context("reading who earned the character first")?;
                first.as_deref() == Some(request.scan_id.as_bytes())
            }
            Err(e) => return Err(anyhow::Error::new(e).context("recording the character's owner")),
        };
        let grant = RewardGrant {
            scan_id: request.scan_id.clone(),
            user_id: request.user_id.clone(),
            character_id: character.character_id.clone(),
            category: category.to_owned(),
            new,
            granted_at: Utc::now(),
        };
        let publish = jetstream::message::PublishMessage::build()
            .payload(
                serde_json::to_vec(&grant)
                    .expect("a grant serialises")
                    .into(),
            )
            .message_id(request.scan_id.clone());
        self.js
            .send_publish(subject::reward_grant(&request.scan_id)?, publish)
            .await
            .context("publishing the grant")?
            .await
            .context("publishing the grant")?;
        tracing::info!(character = %character.character_id, new, "Character granted.");
        Ok(Some(Reward {
            character_id: character.character_id,
            name: character.name,
            new,
        }))
    }
}
