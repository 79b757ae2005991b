//! The reward chain's wire types: the character catalogue, the reward a
//! scan's `result` carries, and the grant on `reward.grant.<scan>`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Localized;

/// The waste categories the vision providers produce, each with a disposal
/// rule; characters are earned from them.
pub const WASTE_CATEGORIES: &[&str] = &[
    "pet_bottle",
    "plastic",
    "glass",
    "paper",
    "paper_pack",
    "metal_can",
    "vinyl",
    "styrofoam",
    "food_waste",
    "clothing",
    "battery",
    "electronics",
    "general",
    UNKNOWN_CATEGORY,
];

/// The category for "cannot tell": it earns no character.
pub const UNKNOWN_CATEGORY: &str = "unknown";

/// Longest `character_id`.
pub const MAX_CHARACTER_ID: usize = 64;
/// Longest name, in characters.
pub const MAX_NAME_CHARS: usize = 80;
/// Longest description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 500;

/// One character of the catalogue: the `characters` KV value, an element of
/// `GET /v1/characters`, the body of `PUT /v1/admin/characters/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Character {
    /// Lower-case letters, digits, `_` and `-`, at most 64 (a KV key and subject token).
    pub character_id: String,
    /// The name in Korean and English.
    pub name: Localized,
    /// A short description in Korean and English.
    pub description: Localized,
    /// The waste categories it can be earned from (not `unknown`).
    pub categories: Vec<String>,
    /// Among the characters matching a scan's category, the highest wins.
    pub priority: i32,
}

/// What is wrong with a character, naming the field (`name.ko`, `categories[2]`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct CharacterError {
    /// The JSON path of the offending field.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> CharacterError {
    CharacterError {
        field: field.into(),
        message: message.into(),
    }
}

/// True for an id usable as a KV key, a subject token and a URL segment.
pub fn valid_character_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CHARACTER_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl Character {
    /// Reads a character from JSON, naming the field when one is missing,
    /// unknown or of the wrong type, then [`Self::validate`]s it.
    ///
    /// # Errors
    /// The first bad field, as [`CharacterError`].
    pub fn from_json(value: &serde_json::Value) -> Result<Self, CharacterError> {
        const FIELDS: &[&str] = &[
            "character_id",
            "name",
            "description",
            "categories",
            "priority",
        ];
        let object = value
            .as_object()
            .ok_or_else(|| bad("body", "must be a JSON object"))?;
        if let Some(unknown) = object.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(bad(unknown.clone(), "is not a character field"));
        }
        let field = |name: &str| object.get(name).ok_or_else(|| bad(name, "is missing"));
        let string = |value: &serde_json::Value, name: &str| {
            value
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| bad(name, "must be a string"))
        };
        let localized = |name: &str| -> Result<Localized, CharacterError> {
            let value = field(name)?;
            let object = value
                .as_object()
                .ok_or_else(|| bad(name, "must be an object with \"ko\" and \"en\""))?;
            if let Some(unknown) = object.keys().find(|k| *k != "ko" && *k != "en") {
                return Err(bad(
                    format!("{name}.{unknown}"),
                    "is not a language (ko, en)",
                ));
            }
            let text = |lang: &str| {
                let path = format!("{name}.{lang}");
                let value = object
                    .get(lang)
                    .ok_or_else(|| bad(path.clone(), "is missing"))?;
                string(value, &path)
            };
            Ok(Localized {
                ko: text("ko")?,
                en: text("en")?,
            })
        };
        let categories = field("categories")?
            .as_array()
            .ok_or_else(|| bad("categories", "must be an array of category names"))?
            .iter()
            .enumerate()
            .map(|(i, c)| string(c, &format!("categories[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let priority = field("priority")?
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| bad("priority", "must be a whole number (32-bit)"))?;
        let character = Self {
            character_id: string(field("character_id")?, "character_id")?,
            name: localized("name")?,
            description: localized("description")?,
            categories,
            priority,
        };
        character.validate()?;
        Ok(character)
    }

    /// Checks every field.
    ///
    /// # Errors
    /// The first bad field: an id that is not `[a-z0-9_-]{1,64}`, an empty or
    /// too long name or description, no categories, a category that is not
    /// a disposal-rule category (or is `unknown`), one listed twice.
    pub fn validate(&self) -> Result<(), CharacterError> {
        if !valid_character_id(&self.character_id) {
            return Err(bad(
                "character_id",
                "must be 1-64 characters of a-z, 0-9, '_' and '-'",
            ));
        }
        for (field, text, max) in [
            ("name.ko", &self.name.ko, MAX_NAME_CHARS),
            ("name.en", &self.name.en, MAX_NAME_CHARS),
            (
                "description.ko",
                &self.description.ko,
                MAX_DESCRIPTION_CHARS,
            ),
            (
                "description.en",
                &self.description.en,
                MAX_DESCRIPTION_CHARS,
            ),
        ] {
            if text.trim().is_empty() {
                return Err(bad(field, "must not be empty"));
            }
            if text.chars().count() > max {
                return Err(bad(field, format!("must be at most {max} characters")));
            }
        }
        if self.categories.is_empty() {
            return Err(bad("categories", "must list at least one category"));
        }
        for (i, category) in self.categories.iter().enumerate() {
            let field = format!("categories[{i}]");
            if category == UNKNOWN_CATEGORY {
                return Err(bad(field, "\"unknown\" earns no character"));
            }
            if !WASTE_CATEGORIES.contains(&category.as_str()) {
                return Err(bad(
                    field,
                    format!("{category:?} is not a disposal-rule category"),
                ));
            }
            if self.categories[..i].contains(category) {
                return Err(bad(field, format!("{category:?} is listed twice")));
            }
        }
        Ok(())
    }

    /// True when a scan of `category` can earn this character.
    pub fn matches(&self, category: &str) -> bool {
        self.categories.iter().any(|c| c == category)
    }
}

/// The best character for `category` among `characters`: the highest
/// `priority`, ties broken by the smaller `character_id` so every streamer
/// picks the same one.
pub fn best_match<'a>(
    characters: impl IntoIterator<Item = &'a Character>,
    category: &str,
) -> Option<&'a Character> {
    characters
        .into_iter()
        .filter(|c| c.matches(category))
        .max_by(|a, b| {
            a.priority
                .cmp(&b.priority)
                .then_with(|| b.character_id.cmp(&a.character_id))
        })
}

/// The reward a scan's `result` carries (`null` when no character matches).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Reward {
    /// The character earned.
    pub character_id: String,
    /// Its name in Korean and English.
    pub name: Localized,
    /// True when this scan is the one that first earned it for this user.
    pub new: bool,
}

/// A character earned by one scan, on `reward.grant.<scan>` for the
/// persister (`character_ownership` and `my_characters`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewardGrant {
    /// The scan that earned it; one grant per scan.
    pub scan_id: String,
    /// The JWT `sub` of the scan's owner, verbatim.
    pub user_id: String,
    /// The character earned.
    pub character_id: String,
    /// The scan's waste category.
    pub category: String,
    /// True when this scan first earned the character for the user.
    pub new: bool,
    /// When the streamer granted it.
    pub granted_at: DateTime<Utc>,
}

/// `history.characters`: the caller's collection, answered by the persisters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryCharactersRequest {
    /// The JWT `sub`.
    pub user_id: String,
}

/// One character a user owns, as the persisters store it (the gateway adds
/// the catalogue's `name`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OwnedCharacter {
    /// The character.
    pub character_id: String,
    /// When the user first earned it.
    pub first_earned_at: DateTime<Utc>,
    /// The scan that first earned it.
    pub scan_id: String,
    /// How many scans earned it.
    pub times_earned: u32,
    /// When a scan last earned it.
    pub last_earned_at: DateTime<Utc>,
}

/// The `history.characters` answer: first earned first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OwnedCharacters {
    /// The user's characters.
    pub characters: Vec<OwnedCharacter>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn character(id: &str, categories: &[&str], priority: i32) -> Character {
        Character {
            character_id: id.into(),
            name: Localized {
                ko: "페티".into(),
                en: "Petty".into(),
            },
            description: Localized {
                ko: "설명".into(),
                en: "About".into(),
            },
            categories: categories.iter().map(|c| (*c).to_owned()).collect(),
            priority,
        }
    }

    #[test]
    fn the_highest_priority_among_matches_wins_and_ties_are_stable() {
        let all = [
            character("a", &["glass"], 1),
            character("b", &["glass", "paper"], 5),
            character("c", &["paper"], 9),
            character("d", &["glass"], 5),
        ];
        assert_eq!(best_match(&all, "glass").unwrap().character_id, "b");
        assert_eq!(best_match(&all, "paper").unwrap().character_id, "c");
        assert!(best_match(&all, "unknown").is_none());
    }

    #[test]
    fn a_bad_character_names_its_field() {
        let field = |c: Character| c.validate().unwrap_err().field;
        assert_eq!(field(character("Bad Id", &["glass"], 1)), "character_id");
        let mut c = character("ok", &["glass"], 1);
        c.name.en = " ".into();
        assert_eq!(field(c), "name.en");
        let mut c = character("ok", &["glass"], 1);
        c.description.ko = "x".repeat(501);
        assert_eq!(field(c), "description.ko");
        assert_eq!(field(character("ok", &[], 1)), "categories");
        assert_eq!(
            field(character("ok", &["glass", "rocks"], 1)),
            "categories[1]"
        );
        assert_eq!(field(character("ok", &["unknown"], 1)), "categories[0]");
        assert_eq!(
            field(character("ok", &["glass", "glass"], 1)),
            "categories[1]"
        );
        assert!(character("ok-1_x", &["glass"], -3).validate().is_ok());
    }

    #[test]
    fn json_with_a_missing_unknown_or_mistyped_field_names_it() {
        let good = serde_json::to_value(character("ok", &["glass"], 1)).unwrap();
        assert_eq!(
            Character::from_json(&good).unwrap(),
            character("ok", &["glass"], 1)
        );
        let field = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v = good.clone();
            edit(&mut v);
            Character::from_json(&v).unwrap_err().field
        };
        assert_eq!(field(&|v| v["priority"] = "high".into()), "priority");
        assert_eq!(field(&|v| v["priority"] = 1.5.into()), "priority");
        assert_eq!(field(&|v| v["mood"] = "happy".into()), "mood");
        assert_eq!(
            field(&|v| {
                v["name"].as_object_mut().unwrap().remove("ko");
            }),
            "name.ko"
        );
        assert_eq!(field(&|v| v["categories"][0] = 3.into()), "categories[0]");
        assert_eq!(field(&|v| v["description"] = "x".into()), "description");
        assert_eq!(
            field(&|v| {
                v.as_object_mut().unwrap().remove("character_id");
            }),
            "character_id"
        );
        assert_eq!(field(&|v| *v = serde_json::json!([1])), "body");
    }
}
