//! The metric series every service emits through this crate (its
//! [`ops`](crate::ops) module), whatever the service: [`ops::register`]
//! registers them at zero beside the service's own catalogue. Prometheus's
//! `job` label tells the services apart, so these names carry no service
//! prefix.
//!
//! [`ops::register`]: crate::ops::register

use crate::ops::{Kind, Series};

/// The values `readiness_status`'s `status` label takes (`/readyz`'s `status`).
pub const READINESS_STATUSES: [&str; 3] = ["ok", "degraded", "unavailable"];

/// Every series the shared crate emits.
pub const SERIES: &[Series] = &[Series {
    name: "readiness_status",
    kind: Kind::Gauge,
    help: "1 for the status the last readiness check found (ok, degraded: ready but impaired, unavailable), 0 for the others.",
    labels: &[
        &[("status", "ok")],
        &[("status", "degraded")],
        &[("status", "unavailable")],
    ],
}];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalogue_lists_exactly_the_metrics_the_code_emits() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mismatches = crate::ops::catalogue_mismatches(SERIES, &src, "readiness_").unwrap();
        assert!(mismatches.is_empty(), "{mismatches:#?}");
    }

    #[test]
    fn readiness_label_values_are_the_statuses_readyz_reports() {
        let listed: Vec<&str> = SERIES[0].labels.iter().map(|set| set[0].1).collect();
        assert_eq!(listed, READINESS_STATUSES);
    }
}
