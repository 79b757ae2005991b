//! The stages in order: stored (the image read back from the object
//! store), hashed and the cache check, preprocessed, vision, rules, answer,
//! reward (a cache hit goes from hashed to cache_hit and then reward too),
//! done and the `result`. Each stage with more to it than a line lives in
//! its own file.

use super::*;

impl ScanWorker {
    pub(super) async fn pipeline(
        &self,
        request: &ScanRequest,
        events: &mut Events,
    ) -> Result<ScanRecord, Stop> {
        let bytes = self.fetch(request).await?;
        events
            .progress(
                ScanStage::Stored,
                10,
                format!(
                    "Image received ({} KB, {} x {}).",
                    bytes.len().div_ceil(1024),
                    request.width,
                    request.height
                ),
            )
            .await?;

        let hashed = blocking(move || hash(&bytes)).await?;
        events
            .progress(
                ScanStage::Hashed,
                20,
                format!("Fingerprint {}.", hashed.phash),
            )
            .await?;
        if let Some(earlier) = self.cached(&hashed.phash, &request.lang).await {
            events
                .progress(
                    ScanStage::CacheHit,
                    90,
                    "The same item was scanned before; using that result.".into(),
                )
                .await?;
            // The earlier scan's reward was that scan's: this one earns its own.
            let reward = match &earlier.category {
                Some(category) => self.reward(request, category, events).await?,
                None => None,
            };
            let record = ScanRecord {
                scan_id: request.scan_id.clone(),
                user_id: request.user_id.clone(),
                sha256: Some(hashed.sha256),
                cached: true,
                reward,
                created_at: request.created_at,
                completed_at: Some(Utc::now()),
                ..earlier
            };
            return self.finish(events, record).await;
        }

        let image = hashed.image;
        let jpeg_wanted = self.vision.wants_jpeg();
        let prepared = blocking(move || prepare(image, jpeg_wanted)).await?;
        events
            .progress(
                ScanStage::Preprocessed,
                30,
                format!(
                    "Prepared a {} x {} image.",
                    prepared.rgb.width(),
                    prepared.rgb.height()
                ),
            )
            .await?;

        events
            .progress(ScanStage::Vision, 50, "Looking at the item.".into())
            .await?;
        let seen = self.classify(&prepared, events).await?;
        let rule = self.grounding.rules().for_category(&seen.category).clone();
        // What the labels retrieve beyond the category's own rule: a cup
        // seen as general waste may be paper or plastic by material.
        let labels: Vec<&str> = seen.labels.iter().map(|l| l.label.as_str()).collect();
        let related: Vec<DisposalRule> = self
            .grounding
            .scan(&seen.category, &labels)
            .into_iter()
            .skip(1)
            .cloned()
            .collect();
        events
            .progress(
                ScanStage::Vision,
                60,
                format!(
                    "Looks like {} ({:.0} %).",
                    rule.name.en,
                    seen.confidence * 100.0
                ),
            )
            .await?;
        events
            .progress(
                ScanStage::Rules,
                70,
                format!("Goes to: {}.", localized(&rule.bin, &request.lang)),
            )
            .await?;

        let answer = self
            .explain(request, &seen, &rule, &related, events)
            .await?;
        events
            .progress(ScanStage::Answer, 90, "Explanation written.".into())
            .await?;
        let reward = self.reward(request, &seen.category, events).await?;
        let record = ScanRecord {
            scan_id: request.scan_id.clone(),
            user_id: request.user_id.clone(),
            status: ScanStatus::Done,
            category: Some(seen.category),
            confidence: Some(seen.confidence),
            labels: seen.labels,
            vision_model: Some(seen.model),
            phash: Some(hashed.phash),
            sha256: Some(hashed.sha256),
            rule: Some(rule),
            answer: Some(answer),
            cached: false,
            reward,
            error: None,
            created_at: request.created_at,
            completed_at: Some(Utc::now()),
        };
        self.finish(events, record).await
    }

    pub(super) async fn finish(
        &self,
        events: &mut Events,
        record: ScanRecord,
    ) -> Result<ScanRecord, Stop> {
        events
            .progress(ScanStage::Done, 100, "Done.".into())
            .await?;
        events
            .emit(ScanEventData::Result(Box::new(record.clone())))
            .await?;
        Ok(record)
    }

    pub(super) async fn fetch(&self, request: &ScanRequest) -> Result<Vec<u8>, Stop> {
        let mut object = match self.images.get(&request.object).await {
            Ok(o) => o,
            Err(e) if e.kind() == jetstream::object_store::GetErrorKind::NotFound => {
                return Err(Stop::Failed(Failure::input(
                    "image_missing",
                    "the uploaded image is no longer stored".into(),
                    ScanStage::Stored,
                )));
            }
            Err(e) => {
                return Err(Stop::Bus(
                    anyhow::Error::new(e).context("reading the image"),
                ));
            }
        };
        let mut bytes = Vec::with_capacity(request.bytes as usize);
        object
            .read_to_end(&mut bytes)
            .await
            .context("reading the image")?;
        Ok(bytes)
    }
}
