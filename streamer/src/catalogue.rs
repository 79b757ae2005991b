//! The character catalogue: the built-in file (`streamer/rules/characters.json`,
//! or `SCAN_CHARACTERS`) validated at startup and seeded into the
//! `characters` KV bucket, and each streamer's match cache of that bucket.
//!
//! The bucket is the catalogue's durable home: the admin API writes it, and
//! every streamer keeps a [`MatchCache`] current with a KV watch, the
//! JetStream way to do the seeds' `character.cache` fanout: a full refresh
//! (every key's latest value) when the watch starts or restarts, then each
//! upsert and delete as it lands. The file only seeds a bucket that was
//! never written, so an admin's deletions survive restarts (a delete leaves
//! a tombstone, and the bucket is no longer empty).

use std::{collections::HashMap, sync::Arc, time::Duration};

use anyhow::Context as _;
use async_nats::jetstream::kv;
use bus::wire::{Character, UNKNOWN_CATEGORY, WASTE_CATEGORIES, best_match};
use futures::StreamExt as _;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const BUILT_IN: &str = include_str!("../rules/characters.json");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    #[allow(dead_code)]
    source: String,
    /// Read field by field ([`Character::from_json`]) so an error names its field.
    characters: Vec<serde_json::Value>,
}

/// A validated catalogue file.
#[derive(Debug, Clone)]
pub struct Catalogue {
    /// The characters, in file order.
    pub characters: Vec<Character>,
}

impl Catalogue {
    /// The built-in catalogue.
    ///
    /// # Errors
    /// Never for the committed file (a test checks it).
    pub fn built_in() -> anyhow::Result<Self> {
        Self::parse(BUILT_IN).context("the built-in character catalogue is invalid")
    }

    /// The catalogue at `path`, or the built-in one.
    ///
    /// # Errors
    /// When the file cannot be read or fails validation; the message says where.
    pub fn load(path: Option<&std::path::Path>) -> anyhow::Result<Self> {
        match path {
            None => Self::built_in(),
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!("cannot read SCAN_CHARACTERS file {}", path.display())
                })?;
                Self::parse(&text)
                    .with_context(|| format!("SCAN_CHARACTERS file {} is invalid", path.display()))
            }
        }
    }

    /// Parses and validates a catalogue document.
    ///
    /// # Errors
    /// The first problem: bad JSON (with its line), an unknown version, a bad
    /// field (named, with the character), an id listed twice, or a disposal
    /// category no character can be earned from.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let file: File = serde_json::from_str(text).context("not a character catalogue")?;
        anyhow::ensure!(
            file.version == 1,
            "unsupported catalogue version {}",
            file.version
        );
        let mut seen = std::collections::HashSet::new();
        let mut characters = Vec::with_capacity(file.characters.len());
        for (i, value) in file.characters.iter().enumerate() {
            let id = value["character_id"].as_str().unwrap_or("?");
            let character =
                Character::from_json(value).with_context(|| format!("character {i} ({id:?})"))?;
            anyhow::ensure!(
                seen.insert(character.character_id.clone()),
                "character id {:?} appears twice",
                character.character_id
            );
            characters.push(character);
        }
        for category in WASTE_CATEGORIES {
            if *category == UNKNOWN_CATEGORY {
                continue;
            }
            anyhow::ensure!(
                characters.iter().any(|c| c.matches(category)),
                "no character can be earned from category {category:?}"
            );
        }
        Ok(Self { characters })
    }

    /// Writes the catalogue into `bucket` when the bucket was never written
    /// (no message at all, not even a delete's tombstone). Each key is
    /// created, not put, so two streamers seeding at once write each once.
    ///
    /// # Errors
    /// When the bucket cannot be read or written.
    pub async fn seed(&self, bucket: &kv::Store) -> anyhow::Result<bool> {
        let status = bucket
            .status()
            .await
            .context("reading the characters bucket")?;
        if status.values() > 0 {
            return Ok(false);
        }
        for character in &self.characters {
            let value = serde_json::to_vec(character).expect("a character serialises");
            match bucket.create(&character.character_id, value.into()).await {
                Ok(_) => {}
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(anyhow::Error::new(e).context("seeding the characters bucket"));
                }
            }
        }
        tracing::info!(
            characters = self.characters.len(),
            "Seeded the character catalogue."
        );
        Ok(true)
    }
}

/// The characters this streamer matches scans against, kept current from
/// the `characters` bucket. Cloned into every scan worker.
#[derive(Clone)]
pub struct MatchCache {
    /// `None` until the first full refresh arrived.
    current: watch::Receiver<Option<Arc<HashMap<String, Character>>>>,
}

impl MatchCache {
    /// Starts watching `bucket` and returns the cache; the watch task runs
    /// until `shutdown` and restarts itself (with a full refresh) when the
    /// watch breaks.
    pub fn start(bucket: kv::Store, shutdown: CancellationToken) -> Self {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let mut attempt = 0;
            loop {
                let outcome = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    outcome = follow(&bucket, &tx) => outcome,
                };
                if let Err(error) = outcome {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "The character watch broke; starting over."
                    );
                }
                attempt += 1;
                let delay = bus::backoff::delay(
                    Duration::from_millis(100),
                    attempt.min(10),
                    Duration::from_secs(5),
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        });
        Self { current: rx }
    }

    /// The best character for `category`, waiting for the first full
    /// refresh if it has not arrived (the caller bounds the wait).
    pub async fn best_for(&self, category: &str) -> Option<Character> {
        let mut current = self.current.clone();
        let ready = current.wait_for(Option::is_some).await.ok()?;
        let characters = ready.as_ref()?;
        best_match(characters.values(), category).cloned()
    }

    /// The cached character `id`, if the cache is loaded and has it.
    pub fn get(&self, id: &str) -> Option<Character> {
        self.current.borrow().as_ref()?.get(id).cloned()
    }
}

/// One life of the watch: the full refresh, then upserts and deletes until
/// the watch ends or fails.
async fn follow(
    bucket: &kv::Store,
    tx: &watch::Sender<Option<Arc<HashMap<String, Character>>>>,
) -> anyhow::Result<()> {
    // An empty bucket sends nothing on a watch: the full refresh is then
    // the empty catalogue, not a wait.
    let empty = bucket
        .status()
        .await
        .context("reading the bucket")?
        .values()
        == 0;
    let mut entries = bucket
        .watch_with_history(">")
        .await
        .context("watching the characters bucket")?;
    let mut fresh: HashMap<String, Character> = HashMap::new();
    let mut refreshed = false;
    if empty {
        publish_refresh(tx, HashMap::new());
        refreshed = true;
    }
    while let Some(entry) = entries.next().await {
        let entry = entry.context("reading the characters watch")?;
        let change = match entry.operation {
            kv::Operation::Put => match serde_json::from_slice::<Character>(&entry.value)
                .ok()
                .filter(|c| c.validate().is_ok() && c.character_id == entry.key)
            {
                Some(character) => Some(character),
                None => {
                    tracing::warn!(key = %entry.key, "Ignoring an invalid catalogue entry.");
                    None
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => None,
        };
        if !refreshed {
            match change {
                Some(character) => {
                    fresh.insert(entry.key.clone(), character);
                }
                None => {
                    fresh.remove(&entry.key);
                }
            }
            if entry.delta == 0 {
                publish_refresh(tx, std::mem::take(&mut fresh));
                refreshed = true;
            }
            continue;
        }
        let kind = if change.is_some() { "upsert" } else { "delete" };
        tx.send_modify(|current| {
            let mut next: HashMap<String, Character> =
                current.as_deref().cloned().unwrap_or_default();
            match change {
                Some(character) => {
                    next.insert(entry.key.clone(), character);
                }
                None => {
                    next.remove(&entry.key);
                }
            }
            *current = Some(Arc::new(next));
        });
        metrics::counter!("streamer_character_cache_events_total", "kind" => kind).increment(1);
        tracing::info!(character = %entry.key, kind, "Character cache updated.");
    }
    anyhow::bail!("the characters watch ended")
}

fn publish_refresh(
    tx: &watch::Sender<Option<Arc<HashMap<String, Character>>>>,
    characters: HashMap<String, Character>,
) {
    tracing::info!(characters = characters.len(), "Character cache refreshed.");
    metrics::counter!("streamer_character_cache_events_total", "kind" => "full_refresh")
        .increment(1);
    tx.send_replace(Some(Arc::new(characters)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> serde_json::Value {
        serde_json::from_str(BUILT_IN).unwrap()
    }

    fn error_of(doc: &serde_json::Value) -> String {
        format!("{:#}", Catalogue::parse(&doc.to_string()).unwrap_err())
    }

    #[test]
    fn the_built_in_catalogue_covers_every_disposal_category_and_the_highest_priority_wins() {
        let catalogue = Catalogue::built_in().unwrap();
        let rules = crate::rules::Rules::built_in().unwrap();
        for category in crate::rules::CATEGORIES {
            assert!(rules.knows(category));
            let best = best_match(&catalogue.characters, category);
            assert_eq!(best.is_none(), *category == UNKNOWN_CATEGORY, "{category}");
        }
        // Two characters can be earned from a PET bottle; Petty ranks higher.
        assert_eq!(
            best_match(&catalogue.characters, "pet_bottle")
                .unwrap()
                .character_id,
            "petty"
        );
        assert_eq!(
            best_match(&catalogue.characters, "electronics")
                .unwrap()
                .character_id,
            "volty"
        );
    }

    #[test]
    fn bad_catalogue_files_are_refused_naming_the_character_and_field() {
        let mut d = doc();
        d["characters"][2]["name"]["ko"] = "".into();
        let e = error_of(&d);
        assert!(e.contains("character 2") && e.contains("name.ko"), "{e}");

        let mut d = doc();
        d["characters"][0]["categories"] = serde_json::json!(["pet_bottle", "lava"]);
        let e = error_of(&d);
        assert!(e.contains("categories[1]") && e.contains("lava"), "{e}");

        let mut d = doc();
        d["characters"][1]["character_id"] = "petty".into();
        assert!(error_of(&d).contains("appears twice"));

        let mut d = doc();
        d["characters"]
            .as_array_mut()
            .unwrap()
            .retain(|c| c["character_id"] != "dusty");
        let e = error_of(&d);
        assert!(e.contains("\"general\""), "{e}");

        let mut d = doc();
        d["characters"][0]["mood"] = "happy".into();
        assert!(error_of(&d).contains("mood"));

        let mut d = doc();
        d["characters"][0]["priority"] = "high".into();
        assert!(error_of(&d).contains("priority"));

        let mut d = doc();
        d["version"] = 2.into();
        assert!(error_of(&d).contains("version 2"));
        assert!(Catalogue::parse("{").is_err());
    }
}
