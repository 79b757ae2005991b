//! Text to index terms, the same way for the rules and for questions.
//!
//! Korean has no spaces between a noun and its particle ("소주병은") and no
//! dictionary tokenizer works offline here (STACK.md), so each run of Hangul
//! becomes its character bigrams ("소주", "주병", "병은"), as CJK search
//! engines do, plus its single characters, so that a one-syllable name
//! ("캔", "옷") still meets the longer word it sits in ("맥주캔을").
//! Latin text becomes lower-case words without stop words, cut to a crude
//! stem (plural and verb endings), so "bottles" meets "bottle".

/// A term and the weight of the text it came from; a text yields each
/// term as often as it occurs.
pub(super) fn terms(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut hangul: Vec<char> = Vec::new();
    let mut word = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if is_hangul(c) {
            flush_word(&mut word, &mut out);
            hangul.push(c);
        } else if c.is_alphanumeric() {
            flush_hangul(&mut hangul, &mut out);
            word.extend(c.to_lowercase());
        } else {
            flush_hangul(&mut hangul, &mut out);
            flush_word(&mut word, &mut out);
        }
    }
    out
}

/// True for a Hangul syllable (가-힣): the question is in Korean.
pub fn is_hangul(c: char) -> bool {
    ('\u{AC00}'..='\u{D7A3}').contains(&c)
}

fn flush_hangul(run: &mut Vec<char>, out: &mut Vec<String>) {
    for c in run.iter() {
        out.push(c.to_string());
    }
    for pair in run.windows(2) {
        out.push(pair.iter().collect());
    }
    run.clear();
}

fn flush_word(word: &mut String, out: &mut Vec<String>) {
    if !word.is_empty() && !STOP_WORDS.contains(&word.as_str()) {
        out.push(stem(word));
    }
    word.clear();
}

/// English words that say nothing about what is thrown away.
const STOP_WORDS: &[&str] = &[
    "a",
    "an",
    "the",
    "and",
    "or",
    "of",
    "to",
    "in",
    "on",
    "at",
    "for",
    "from",
    "with",
    "by",
    "it",
    "its",
    "is",
    "are",
    "be",
    "do",
    "does",
    "did",
    "i",
    "me",
    "my",
    "we",
    "you",
    "your",
    "how",
    "what",
    "where",
    "which",
    "who",
    "when",
    "why",
    "should",
    "can",
    "could",
    "would",
    "this",
    "that",
    "these",
    "those",
    "there",
    "into",
    "out",
    "up",
    "if",
    "so",
    "as",
    "all",
    "any",
    "some",
    "put",
    "throw",
    "away",
    "dispose",
    "disposal",
    "get",
    "rid",
    "go",
    "goes",
    "bin",
    "recycle",
    "recycling",
    "please",
    "tell",
    "about",
    "have",
    "has",
    "old",
    "after",
    "than",
    "then",
    "them",
    "they",
    "one",
    "kind",
    "type",
    "which",
    "s",
    "t",
    "don",
    "not",
];

/// A crude English stem: enough to meet singular and plural, "-ing" and
/// "-ed" forms of the few hundred words the rules use.
fn stem(word: &str) -> String {
    let w = word;
    let cut = |suffix: &str, min: usize, add: &str| -> Option<String> {
        (w.len() >= min + suffix.len() && w.ends_with(suffix))
            .then(|| format!("{}{add}", &w[..w.len() - suffix.len()]))
    };
    cut("ies", 2, "y")
        .or_else(|| cut("sses", 2, "ss"))
        .or_else(|| cut("ches", 2, "ch"))
        .or_else(|| cut("shes", 2, "sh"))
        .or_else(|| cut("xes", 2, "x"))
        .or_else(|| cut("ing", 3, ""))
        .or_else(|| cut("ed", 3, ""))
        .or_else(|| {
            (!w.ends_with("ss") && !w.ends_with("us"))
                .then(|| cut("s", 2, ""))
                .flatten()
        })
        .unwrap_or_else(|| w.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn korean_becomes_characters_and_bigrams_english_stems() {
        assert_eq!(
            terms("소주병은"),
            ["소", "주", "병", "은", "소주", "주병", "병은"]
        );
        assert_eq!(terms("Soju bottles!"), ["soju", "bottle"]);
        assert_eq!(
            terms("batteries, boxes and glasses"),
            ["battery", "box", "glass"]
        );
        assert_eq!(terms("PET병 2개"), ["pet", "병", "2", "개"]);
        assert!(terms("How do I throw it away?").is_empty());
    }
}
