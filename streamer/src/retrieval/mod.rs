//! Finding the disposal rules a chat question (or a scan's label) is about:
//! BM25 over the rules' names, everyday item names, bins and steps, in
//! Korean and English, built in memory at startup. Why this and not a
//! search engine: `docs/retrieval.md`.
//!
//! One document per rule (the `unknown` rule is for scans that saw nothing
//! and answers no question). Fields weigh differently (BM25F): a name or an
//! item names the thing, a step only mentions it. A question's terms come
//! from it and, at a lower weight, from the user's previous messages, so a
//! follow-up ("그럼 뚜껑은?") keeps the subject of the conversation.
//! A rule counts only above [`THRESHOLD`] and within [`RELATIVE`] of the
//! best: below, no rule applies and the answer says so.

mod tokenize;

use std::collections::HashMap;

use bus::{rules::Rules, wire::DisposalRule};

pub use tokenize::is_hangul;

/// Most rules handed to the model.
pub const TOP_K: usize = 3;
/// The least score of a rule that applies. A question that shares one
/// specific term with a rule's name or items (one English word, one Korean
/// bigram) scores above it; one that shares only common Korean syllables or
/// words of the steps stays below (tuned on the eval set and on off-topic
/// questions, see the eval test).
pub const THRESHOLD: f32 = 2.4;
/// A runner-up is kept only when it scores at least this share of the best:
/// the model answers from the rules it is given, and a weak third one
/// invites it to mix bins.
pub const RELATIVE: f32 = 0.5;
/// The weight of earlier user messages against the question's own terms.
pub const EARLIER_WEIGHT: f32 = 0.4;
/// The weight of a single Hangul syllable against a bigram: it lets a
/// one-syllable name ("캔") match, but a few shared syllables ("날" in
/// "날씨" and "흩날리지") must not add up to a rule.
const SYLLABLE_WEIGHT: f32 = 0.3;
/// Characters of one message a query reads: a question names its subject
/// in far fewer, and a 64 KiB paste must not cost the turn milliseconds.
pub const MAX_QUERY_CHARS: usize = 2_000;

const K1: f32 = 1.2;
const B: f32 = 0.75;
/// Field weights: what names the thing counts most.
const NAME: f32 = 3.0;
const ITEMS: f32 = 3.0;
const BIN: f32 = 1.5;
const STEPS: f32 = 0.5;

/// A rule that applies, with its score.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// The rule's category.
    pub category: String,
    /// Its BM25 score (higher is better).
    pub score: f32,
}

/// The query: terms with weights, from the question and earlier messages.
#[derive(Debug, Clone, Default)]
pub struct Query {
    terms: HashMap<String, f32>,
}

impl Query {
    /// A query for `text` alone.
    pub fn new(text: &str) -> Self {
        let mut query = Self::default();
        query.add(text, 1.0);
        query
    }

    /// Adds the terms of `text` at `weight` (a term repeated counts once:
    /// what a question is about is not how often it says it), of its first
    /// [`MAX_QUERY_CHARS`] characters.
    pub fn add(&mut self, text: &str, weight: f32) -> &mut Self {
        let end = text
            .char_indices()
            .nth(MAX_QUERY_CHARS)
            .map_or(text.len(), |(i, _)| i);
        for term in tokenize::terms(&text[..end]) {
            let single = term.chars().count() == 1 && term.chars().all(is_hangul);
            let weight = if single {
                weight * SYLLABLE_WEIGHT
            } else {
                weight
            };
            let w = self.terms.entry(term).or_insert(0.0);
            *w = w.max(weight);
        }
        self
    }
}

/// The in-memory index of the rules.
#[derive(Debug, Clone)]
pub struct Retriever {
    docs: Vec<Doc>,
    /// Inverse document frequency of each term in any document.
    idf: HashMap<String, f32>,
    avg_len: f32,
}

#[derive(Debug, Clone)]
struct Doc {
    category: String,
    /// Weighted term frequency over the fields.
    tf: HashMap<String, f32>,
    /// Weighted length.
    len: f32,
}

impl Retriever {
    /// Indexes every rule but `unknown`.
    pub fn build(rules: &Rules) -> Self {
        let docs: Vec<Doc> = rules
            .iter()
            .filter(|r| r.category != bus::rules::UNKNOWN)
            .map(doc)
            .collect();
        let n = docs.len() as f32;
        let mut df: HashMap<&str, f32> = HashMap::new();
        for d in &docs {
            for term in d.tf.keys() {
                *df.entry(term).or_default() += 1.0;
            }
        }
        let idf = df
            .into_iter()
            .map(|(t, df)| (t.to_owned(), ((n - df + 0.5) / (df + 0.5) + 1.0).ln()))
            .collect();
        let avg_len = docs.iter().map(|d| d.len).sum::<f32>() / n.max(1.0);
        Self { docs, idf, avg_len }
    }

    /// Every indexed rule's score for `query`, best first (ties by
    /// category, so the order is stable).
    pub fn scores(&self, query: &Query) -> Vec<Hit> {
        let mut hits: Vec<Hit> = self
            .docs
            .iter()
            .map(|d| Hit {
                category: d.category.clone(),
                score: self.score(d, query),
            })
            .collect();
        hits.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| a.category.cmp(&b.category))
        });
        hits
    }

    /// The rules that apply to `query`: at most [`TOP_K`], above
    /// [`THRESHOLD`] and within [`RELATIVE`] of the best; empty when none.
    pub fn search(&self, query: &Query) -> Vec<Hit> {
        let hits = self.scores(query);
        let best = hits.first().map_or(0.0, |h| h.score);
        hits.into_iter()
            .take(TOP_K)
            .filter(|h| h.score >= THRESHOLD && h.score >= best * RELATIVE)
            .collect()
    }

    fn score(&self, doc: &Doc, query: &Query) -> f32 {
        let norm = K1 * (1.0 - B + B * doc.len / self.avg_len);
        query
            .terms
            .iter()
            .filter_map(|(term, weight)| {
                let tf = *doc.tf.get(term)?;
                Some(weight * self.idf[term] * tf * (K1 + 1.0) / (tf + norm))
            })
            .sum()
    }
}

fn doc(rule: &DisposalRule) -> Doc {
    let mut tf: HashMap<String, f32> = HashMap::new();
    let mut len = 0.0;
    let mut add = |text: &str, weight: f32| {
        for term in tokenize::terms(text) {
            *tf.entry(term).or_default() += weight;
            len += weight;
        }
    };
    add(&rule.name.ko, NAME);
    add(&rule.name.en, NAME);
    // The category's own id ("pet_bottle", "paper_pack") is a name too.
    add(&rule.category.replace('_', " "), NAME);
    for item in rule.items.ko.iter().chain(&rule.items.en) {
        add(item, ITEMS);
    }
    add(&rule.bin.ko, BIN);
    add(&rule.bin.en, BIN);
    for step in &rule.steps {
        add(&step.ko, STEPS);
        add(&step.en, STEPS);
    }
    Doc {
        category: rule.category.clone(),
        tf,
        len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn top(r: &Retriever, q: &str) -> Option<String> {
        r.search(&Query::new(q)).first().map(|h| h.category.clone())
    }

    #[test]
    fn everyday_names_find_their_rule_and_small_talk_finds_none() {
        let r = Retriever::build(&Rules::built_in().unwrap());
        assert_eq!(
            top(&r, "Where does a soju bottle go?").as_deref(),
            Some("glass")
        );
        assert_eq!(
            top(&r, "페트병 어떻게 버려요?").as_deref(),
            Some("pet_bottle")
        );
        assert_eq!(top(&r, "건전지는요?").as_deref(), Some("battery"));
        assert_eq!(top(&r, "What's the weather like today?"), None);
        assert_eq!(top(&r, "오늘 날씨 어때?"), None);
    }

    #[test]
    fn a_follow_up_keeps_the_subject_of_the_conversation() {
        let r = Retriever::build(&Rules::built_in().unwrap());
        let mut q = Query::new("라벨은 어떻게 해요?");
        q.add("생수병 버리는 법 알려줘", EARLIER_WEIGHT);
        assert_eq!(r.search(&q)[0].category, "pet_bottle");
    }
}
