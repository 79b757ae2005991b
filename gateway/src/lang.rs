//! The language a client asks for when it names none: `Accept-Language`,
//! reduced to the two the product speaks (`ko`, `en`).

use axum::http::{HeaderMap, header};

/// The best of `ko` and `en` by the `Accept-Language` header's q-values
/// (ties keep the header's order); `None` when it names neither.
pub fn preferred(headers: &HeaderMap) -> Option<&'static str> {
    let mut best: Option<(&'static str, f32)> = None;
    for value in headers.get_all(header::ACCEPT_LANGUAGE) {
        let Ok(value) = value.to_str() else { continue };
        for range in value.split(',') {
            let mut parts = range.split(';');
            let tag = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            let primary = tag.split('-').next().unwrap_or_default();
            let lang = match primary {
                "ko" => "ko",
                "en" => "en",
                _ => continue,
            };
            if q > 0.0 && best.is_none_or(|(_, b)| q > b) {
                best = Some((lang, q));
            }
        }
    }
    best.map(|(lang, _)| lang)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT_LANGUAGE, value.parse().unwrap());
        headers
    }

    #[test]
    fn accept_language_picks_korean_or_english_by_weight() {
        assert_eq!(preferred(&with("ko-KR,ko;q=0.9,en-US;q=0.8")), Some("ko"));
        assert_eq!(preferred(&with("fr, en;q=0.5, ko;q=0.4")), Some("en"));
        assert_eq!(preferred(&with("en-GB;q=0.3, ko;q=0.7")), Some("ko"));
        assert_eq!(preferred(&with("de, fr")), None);
        assert_eq!(preferred(&with("ko;q=0")), None);
        assert_eq!(preferred(&HeaderMap::new()), None);
    }
}
