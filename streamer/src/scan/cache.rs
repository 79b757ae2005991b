//! The perceptual-hash cache (`scan_cache`): an earlier result for the same
//! picture in the same language ends a scan at the `cache_hit` stage.

use super::*;

impl ScanWorker {
    /// Stores a fresh result under its perceptual hash. A failure only costs
    /// a future cache miss.
    pub(super) async fn remember(&self, record: &ScanRecord, lang: &str) {
        let Some(phash) = &record.phash else { return };
        let key = cache_key(phash, lang);
        match serde_json::to_vec(record) {
            Ok(value) => {
                if let Err(error) = self.cache.put(&key, value.into()).await {
                    tracing::warn!(%error, "Caching the scan result failed.");
                }
            }
            Err(error) => tracing::warn!(%error, "Cannot encode the scan result for the cache."),
        }
    }

    pub(super) async fn cached(&self, phash: &str, lang: &str) -> Option<ScanRecord> {
        match self.cache.get(cache_key(phash, lang)).await {
            Ok(Some(value)) => serde_json::from_slice(&value).ok(),
            Ok(None) => None,
            Err(error) => {
                tracing::warn!(%error, "Scan cache lookup failed; computing afresh.");
                None
            }
        }
    }
}

pub(super) fn cache_key(phash: &str, lang: &str) -> String {
    format!("{phash}_{lang}")
}
