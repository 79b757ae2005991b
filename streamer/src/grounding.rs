//! Grounding an answer in the disposal rules: which rules a chat turn (or a
//! scan) is about ([`crate::retrieval`]) and the system prompt that hands
//! them to the model with the instruction to answer only from them, in the
//! question's language. The categories it used become the turn's `sources`.

use bus::{rules::Rules, wire::DisposalRule};

use crate::retrieval::{self, Query, Retriever};

/// How many earlier user messages add to a chat query: enough for a
/// follow-up to keep its subject, few enough that an old subject fades.
const EARLIER_MESSAGES: usize = 2;

/// The rules and their index; built once at startup, shared by every turn.
#[derive(Debug)]
pub struct Grounding {
    rules: Rules,
    retriever: Retriever,
}

/// What a chat turn is grounded in.
#[derive(Debug, Clone, PartialEq)]
pub struct Grounded {
    /// The system prompt: the operator's, the language, the rules.
    pub system: String,
    /// The categories of the rules it carries, most relevant first.
    pub sources: Vec<String>,
}

impl Grounding {
    /// Indexes `rules`.
    pub fn build(rules: Rules) -> Self {
        let retriever = Retriever::build(&rules);
        Self { rules, retriever }
    }

    /// The rules, for the scan pipeline's category lookup.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The system prompt for a chat turn: `base` (the operator's prompt),
    /// then the rules relevant to `question` and the user's `earlier`
    /// messages (oldest first), in the question's language.
    pub fn chat(&self, base: &str, question: &str, earlier: &[&str]) -> Grounded {
        let mut query = Query::new(question);
        for text in earlier.iter().rev().take(EARLIER_MESSAGES) {
            query.add(text, retrieval::EARLIER_WEIGHT);
        }
        let started = std::time::Instant::now();
        let hits = self.retriever.search(&query);
        metrics::histogram!("streamer_retrieval_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("streamer_retrievals_total", "found" => if hits.is_empty() { "none" } else { "rules" })
            .increment(1);
        let rules: Vec<&DisposalRule> = hits
            .iter()
            .filter_map(|h| self.rules.get(&h.category))
            .collect();
        let korean = question.chars().any(retrieval::is_hangul);
        Grounded {
            system: chat_system(base, &rules, korean),
            sources: rules.iter().map(|r| r.category.clone()).collect(),
        }
    }

    /// The rules for a scan: the category's own first, then what its
    /// labels (the image model's class names) retrieve, so a "coffee mug"
    /// seen as `general` also brings the rule its material needs.
    pub fn scan(&self, category: &str, labels: &[&str]) -> Vec<&DisposalRule> {
        let mut out = vec![self.rules.for_category(category)];
        let mut query = Query::default();
        for label in labels {
            query.add(label, 1.0);
        }
        for hit in self.retriever.search(&query) {
            if out.len() < retrieval::TOP_K
                && !out.iter().any(|r| r.category == hit.category)
                && let Some(rule) = self.rules.get(&hit.category)
            {
                out.push(rule);
            }
        }
        out
    }
}

/// The system prompt of a chat turn.
fn chat_system(base: &str, rules: &[&DisposalRule], korean: bool) -> String {
    let lang = if korean { "ko" } else { "en" };
    let mut out = format!(
        "{base}\n\n{}\n",
        if korean {
            "Answer in Korean (한국어로 답하세요)."
        } else {
            "Answer in English."
        }
    );
    if rules.is_empty() {
        out.push_str(
            "No disposal rule matches this message. If it is not about recycling or \
             throwing something away, say in one sentence that it is outside what you know \
             (sorting and disposing of household waste in Korea) and invite a question about that. \
             Do not invent a rule.",
        );
        return out;
    }
    out.push_str(
        "Answer only from the disposal rules below: name the bin and the steps they give. \
         If they do not cover the question, say so instead of guessing.\n",
    );
    for (i, rule) in rules.iter().enumerate() {
        out.push_str(&format!("\n{}", render(i + 1, rule, lang)));
    }
    // Last, where a small model attends most: the bin in the answer's own
    // words to start from (SmolLM2-135M named it in 39 % of answers
    // without this line; see docs/retrieval.md).
    let bin = if korean {
        &rules[0].bin.ko
    } else {
        &rules[0].bin.en
    };
    out.push_str(&format!(
        "\nBegin the answer with the bin of Rule 1: \"{bin}\", then give its steps."
    ));
    out
}

/// One rule as prompt text, in `lang`.
pub fn render(n: usize, rule: &DisposalRule, lang: &str) -> String {
    let pick = |l: &bus::wire::Localized| {
        if lang == "ko" {
            l.ko.clone()
        } else {
            l.en.clone()
        }
    };
    let items = if lang == "ko" {
        &rule.items.ko
    } else {
        &rule.items.en
    };
    let mut out = format!("Rule {n}: {} ({})\n", pick(&rule.name), rule.category);
    if !items.is_empty() {
        out.push_str(&format!("Covers: {}\n", items.join(", ")));
    }
    out.push_str(&format!("Bin: {}\nSteps:\n", pick(&rule.bin)));
    for step in &rule.steps {
        out.push_str(&format!("- {}\n", pick(step)));
    }
    out.push_str(&format!("Why: {}\n", pick(&rule.why)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_korean_question_gets_its_rule_in_korean_and_small_talk_gets_none() {
        let g = Grounding::build(Rules::built_in().unwrap());
        let got = g.chat("BASE", "소주병은 어디에 버려요?", &[]);
        assert_eq!(got.sources.first().map(String::as_str), Some("glass"));
        assert!(got.system.starts_with("BASE"));
        assert!(got.system.contains("Korean"));
        assert!(got.system.contains("유리병 수거함"), "{}", got.system);

        let off = g.chat("BASE", "What's the weather like today?", &[]);
        assert!(off.sources.is_empty());
        assert!(off.system.contains("outside what you know"));
        assert!(off.system.contains("Answer in English."));
    }

    #[test]
    fn a_scan_gets_its_category_first_then_its_material() {
        let g = Grounding::build(Rules::built_in().unwrap());
        let rules = g.scan("general", &["cup", "coffee mug", "espresso"]);
        let categories: Vec<&str> = rules.iter().map(|r| r.category.as_str()).collect();
        assert_eq!(
            categories,
            ["general", "plastic"],
            "a takeout cup's rule comes along"
        );
        // A label that retrieves nothing adds nothing.
        assert_eq!(g.scan("battery", &["zebra"]).len(), 1);
    }
}
