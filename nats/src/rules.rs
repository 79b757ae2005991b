//! The disposal rules: which bin a waste category goes to, how to prepare
//! it and why, and the everyday names of its items, in Korean and English.
//! Loaded once at startup from the built-in `nats/rules/disposal_rules.json`
//! (or `SCAN_RULES`) and validated, so a broken rules file stops the service
//! instead of a scan. Here, not in the streamer, because the gateway's guide
//! serves the same rules the streamer answers from: one file, one loader.

use std::collections::HashMap;

use crate::wire::{DisposalRule, Localized};
use anyhow::Context as _;
use serde::Deserialize;

/// The categories the vision providers produce; each needs a rule.
pub const CATEGORIES: &[&str] = crate::wire::WASTE_CATEGORIES;

/// The category for "cannot tell".
pub const UNKNOWN: &str = crate::wire::UNKNOWN_CATEGORY;

const BUILT_IN: &str = include_str!("../rules/disposal_rules.json");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    #[allow(dead_code)]
    source: String,
    rules: Vec<DisposalRule>,
}

/// The validated rules, by category.
#[derive(Debug, Clone)]
pub struct Rules {
    by_category: HashMap<String, DisposalRule>,
    /// The categories in file order: the guide lists them so.
    order: Vec<String>,
}

impl Rules {
    /// The built-in rules file.
    ///
    /// # Errors
    /// Never for the committed file (a test checks it).
    pub fn built_in() -> anyhow::Result<Self> {
        Self::parse(BUILT_IN).context("the built-in rules file is invalid")
    }

    /// The rules at `path`, or the built-in ones.
    ///
    /// # Errors
    /// When the file cannot be read or fails validation; the message says where.
    pub fn load(path: Option<&std::path::Path>) -> anyhow::Result<Self> {
        match path {
            None => Self::built_in(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read SCAN_RULES file {}", path.display()))?;
                Self::parse(&text)
                    .with_context(|| format!("SCAN_RULES file {} is invalid", path.display()))
            }
        }
    }

    /// Parses and validates a rules document.
    ///
    /// # Errors
    /// The first problem found: bad JSON, an unknown version, a duplicate or
    /// missing category, an empty text.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let file: File = serde_json::from_str(text).context("not a rules document")?;
        anyhow::ensure!(
            file.version == 1,
            "unsupported rules version {}",
            file.version
        );
        let mut by_category = HashMap::new();
        let mut order = Vec::new();
        for rule in file.rules {
            let category = rule.category.clone();
            let texts = [&rule.name, &rule.bin, &rule.why]
                .into_iter()
                .chain(rule.steps.iter());
            for (i, text) in texts.enumerate() {
                check(text).with_context(|| format!("rule {category:?}, text {i}"))?;
            }
            anyhow::ensure!(!rule.steps.is_empty(), "rule {category:?} has no steps");
            // Retrieval finds a rule by its everyday names: a category
            // without them would only be found by its formal name.
            anyhow::ensure!(
                category == UNKNOWN || (!rule.items.ko.is_empty() && !rule.items.en.is_empty()),
                "rule {category:?} has no items in Korean or English"
            );
            order.push(category.clone());
            anyhow::ensure!(
                by_category.insert(category.clone(), rule).is_none(),
                "category {category:?} appears twice"
            );
        }
        for category in CATEGORIES {
            anyhow::ensure!(
                by_category.contains_key(*category),
                "no rule for category {category:?}"
            );
        }
        Ok(Self { by_category, order })
    }

    /// The rule for `category`; an unknown category gets the `unknown` rule.
    pub fn for_category(&self, category: &str) -> &DisposalRule {
        self.by_category
            .get(category)
            .or_else(|| self.by_category.get(UNKNOWN))
            .expect("validated: the unknown rule exists")
    }

    /// The rule for `category`, if it has one of its own.
    pub fn get(&self, category: &str) -> Option<&DisposalRule> {
        self.by_category.get(category)
    }

    /// Every rule, in the file's order.
    pub fn iter(&self) -> impl Iterator<Item = &DisposalRule> {
        self.order.iter().map(|c| &self.by_category[c])
    }

    /// True when `category` has a rule of its own.
    pub fn knows(&self, category: &str) -> bool {
        self.by_category.contains_key(category)
    }
}

fn check(text: &Localized) -> anyhow::Result<()> {
    anyhow::ensure!(!text.ko.trim().is_empty(), "empty Korean text");
    anyhow::ensure!(!text.en.trim().is_empty(), "empty English text");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_rules_cover_every_category_in_both_languages() {
        let rules = Rules::built_in().unwrap();
        for category in CATEGORIES {
            assert_eq!(rules.for_category(category).category, *category);
        }
        assert_eq!(rules.for_category("spaceship").category, UNKNOWN);
    }

    #[test]
    fn broken_rules_are_refused_with_the_reason() {
        let mut doc: serde_json::Value = serde_json::from_str(BUILT_IN).unwrap();
        doc["rules"]
            .as_array_mut()
            .unwrap()
            .retain(|r| r["category"] != "glass");
        let e = Rules::parse(&doc.to_string()).unwrap_err();
        assert!(format!("{e:#}").contains("glass"), "{e:#}");

        let mut doc: serde_json::Value = serde_json::from_str(BUILT_IN).unwrap();
        doc["rules"][0]["why"]["ko"] = "".into();
        let e = Rules::parse(&doc.to_string()).unwrap_err();
        assert!(format!("{e:#}").contains("Korean"), "{e:#}");

        let mut doc: serde_json::Value = serde_json::from_str(BUILT_IN).unwrap();
        doc["rules"][0]["items"]["en"] = serde_json::json!([]);
        let e = Rules::parse(&doc.to_string()).unwrap_err();
        assert!(format!("{e:#}").contains("items"), "{e:#}");

        let mut doc: serde_json::Value = serde_json::from_str(BUILT_IN).unwrap();
        let first = doc["rules"][0].clone();
        doc["rules"].as_array_mut().unwrap().push(first);
        assert!(format!("{:#}", Rules::parse(&doc.to_string()).unwrap_err()).contains("twice"));
        assert!(Rules::parse("{").is_err());
    }
}
