//! From ImageNet classes to waste categories.
//!
//! ImageNet-1k knows objects, not materials, so the mapping only names the
//! classes whose photo says what the item is made of or how it is thrown
//! away; the other classes (animals, scenes, vehicles, furniture...) count
//! for nothing. A category's confidence is the sum of the softmax
//! probabilities of its classes, the best category wins, and under the
//! threshold the answer is `unknown`, for the LLM and the user to settle.
//! docs/vision.md explains each choice.
//!
//! `paper_pack`, `styrofoam` and `battery` have no ImageNet-1k class (there
//! is no drink carton, foam tray or battery among the 1000), so this model
//! never answers them; they stay in [`CATEGORIES`] because the rules file
//! and other providers use them.

pub use crate::rules::{CATEGORIES, UNKNOWN};

/// Default confidence a category needs. A quarter of the probability mass
/// on one category: on the test photos a recognised item scores 0.9 and
/// more, while a photo the mapping does not cover (a cat, a rocket) or a
/// blank image leaves every category far below, as the
/// `vision_local` tests show; a lower bar lets stray mass from a few
/// look-alike classes decide, a higher one throws away correct answers of
/// a model that splits an item over neighbours (beer bottle / pop bottle).
pub const DEFAULT_THRESHOLD: f64 = 0.25;

/// `(category, [(ImageNet index, class name)])`. The names are checked
/// against the class list by a test, so a wrong index cannot hide here.
pub const MAPPING: &[(&str, &[(usize, &str)])] = &[
    // Clear drink bottles are PET in practice; ImageNet's "pop bottle" and
    // "water bottle" are exactly the soft-drink and water bottles.
    ("pet_bottle", &[(737, "pop bottle"), (898, "water bottle")]),
    // Other rigid plastic containers.
    (
        "plastic",
        &[
            (720, "pill bottle"),
            (899, "water jug"),
            (804, "soap dispenser"),
            (631, "lotion"),
            (838, "sunscreen"),
            (647, "measuring cup"),
            (463, "bucket"),
        ],
    ),
    (
        "glass",
        &[
            (440, "beer bottle"),
            (907, "wine bottle"),
            (441, "beer glass"),
            (572, "goblet"),
            (966, "red wine"),
            (711, "perfume"),
            (438, "beaker"),
        ],
    ),
    // Clean paper and cardboard. Toilet tissue and paper towels are not
    // here: used ones are general waste.
    (
        "paper",
        &[
            (478, "carton"),
            (549, "envelope"),
            (921, "book jacket"),
            (917, "comic book"),
            (918, "crossword puzzle"),
            (922, "menu"),
            (446, "binder"),
        ],
    ),
    ("paper_pack", &[]),
    // Cans and scrap metal: aerosol cans and metal cookware go with cans.
    (
        "metal_can",
        &[
            (585, "hair spray"),
            (653, "milk can"),
            (503, "cocktail shaker"),
            (567, "frying pan"),
            (909, "wok"),
            (469, "caldron"),
            (544, "Dutch oven"),
        ],
    ),
    // Plastic film and bags.
    (
        "vinyl",
        &[
            (728, "plastic bag"),
            (793, "shower cap"),
            (794, "shower curtain"),
        ],
    ),
    ("styrofoam", &[]),
    // Food and leftovers. Coffee is not here: grounds and a ceramic cup go
    // to general waste (below).
    (
        "food_waste",
        &[
            (924, "guacamole"),
            (925, "consomme"),
            (926, "hot pot"),
            (927, "trifle"),
            (928, "ice cream"),
            (929, "ice lolly"),
            (930, "French loaf"),
            (931, "bagel"),
            (932, "pretzel"),
            (933, "cheeseburger"),
            (934, "hotdog"),
            (935, "mashed potato"),
            (936, "head cabbage"),
            (937, "broccoli"),
            (938, "cauliflower"),
            (939, "zucchini"),
            (940, "spaghetti squash"),
            (941, "acorn squash"),
            (942, "butternut squash"),
            (943, "cucumber"),
            (944, "artichoke"),
            (945, "bell pepper"),
            (946, "cardoon"),
            (947, "mushroom"),
            (948, "Granny Smith"),
            (949, "strawberry"),
            (950, "orange"),
            (951, "lemon"),
            (952, "fig"),
            (953, "pineapple"),
            (954, "banana"),
            (955, "jackfruit"),
            (956, "custard apple"),
            (957, "pomegranate"),
            (959, "carbonara"),
            (960, "chocolate sauce"),
            (961, "dough"),
            (962, "meat loaf"),
            (963, "pizza"),
            (964, "potpie"),
            (965, "burrito"),
            (969, "eggnog"),
            (987, "corn"),
            (998, "ear"),
        ],
    ),
    (
        "clothing",
        &[
            (610, "jersey"),
            (841, "sweatshirt"),
            (474, "cardigan"),
            (608, "jean"),
            (655, "miniskirt"),
            (689, "overskirt"),
            (869, "trench coat"),
            (568, "fur coat"),
            (617, "lab coat"),
            (614, "kimono"),
            (697, "pajama"),
            (834, "suit"),
            (735, "poncho"),
            (501, "cloak"),
            (775, "sarong"),
            (824, "stole"),
            (652, "military uniform"),
            (411, "apron"),
            (459, "brassiere"),
            (445, "bikini"),
            (638, "maillot"),
            (639, "maillot tank suit"),
            (842, "swimming trunks"),
            (806, "sock"),
            (496, "Christmas stocking"),
            (658, "mitten"),
            (457, "bow tie"),
            (515, "cowboy hat"),
            (808, "sombrero"),
            (452, "bonnet"),
            (770, "running shoe"),
            (774, "sandal"),
            (514, "cowboy boot"),
            (502, "clog"),
            (630, "Loafer"),
            (911, "wool"),
        ],
    ),
    ("battery", &[]),
    // Small appliances and electronic devices (e-waste collection).
    (
        "electronics",
        &[
            (487, "cellular telephone"),
            (528, "dial telephone"),
            (620, "laptop"),
            (681, "notebook"),
            (590, "hand-held computer"),
            (527, "desktop computer"),
            (664, "monitor"),
            (782, "screen"),
            (851, "television"),
            (605, "iPod"),
            (761, "remote control"),
            (508, "computer keyboard"),
            (673, "mouse"),
            (662, "modem"),
            (742, "printer"),
            (592, "hard disc"),
            (632, "loudspeaker"),
            (754, "radio"),
            (848, "tape player"),
            (482, "cassette player"),
            (485, "CD player"),
            (613, "joystick"),
            (745, "projector"),
            (732, "Polaroid camera"),
            (759, "reflex camera"),
            (531, "digital watch"),
            (530, "digital clock"),
            (650, "microphone"),
            (740, "power drill"),
            (606, "iron"),
            (545, "electric fan"),
            (811, "space heater"),
            (859, "toaster"),
            (651, "microwave"),
            (550, "espresso maker"),
            (891, "waffle iron"),
            (882, "vacuum"),
        ],
    ),
    // Ceramics, coffee, used tissue and small mixed-material items that no
    // recycling stream takes.
    (
        "general",
        &[
            (967, "espresso"),
            (968, "cup"),
            (504, "coffee mug"),
            (923, "plate"),
            (849, "teapot"),
            (901, "whiskey jug"),
            (999, "toilet tissue"),
            (700, "paper towel"),
            (529, "diaper"),
            (419, "Band Aid"),
            (418, "ballpoint"),
            (563, "fountain pen"),
            (629, "lipstick"),
            (626, "lighter"),
            (845, "syringe"),
            (584, "hair slide"),
            (836, "sunglass"),
            (837, "sunglasses"),
        ],
    ),
];

/// The category an ImageNet class counts for, if any.
#[must_use]
pub fn category_of(class: usize) -> Option<&'static str> {
    MAPPING
        .iter()
        .find(|(_, classes)| classes.iter().any(|(index, _)| *index == class))
        .map(|(category, _)| *category)
}

/// The winning category and its confidence for a softmax over the 1000
/// classes; [`UNKNOWN`] with the best category's confidence when that is
/// below `threshold`.
#[must_use]
pub fn categorize(probs: &[f32], threshold: f64) -> (&'static str, f64) {
    let (category, confidence) = MAPPING
        .iter()
        .map(|(category, classes)| {
            let sum: f64 = classes
                .iter()
                .filter_map(|(index, _)| probs.get(*index))
                .map(|p| f64::from(*p))
                .sum();
            (*category, sum)
        })
        .fold(
            (UNKNOWN, 0.0),
            |best, next| {
                if next.1 > best.1 { next } else { best }
            },
        );
    if confidence < threshold {
        (UNKNOWN, confidence)
    } else {
        (category, confidence)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::vision::local::imagenet_class;

    #[test]
    fn every_index_names_the_class_it_claims() {
        for (category, classes) in MAPPING {
            for (index, name) in *classes {
                assert_eq!(
                    imagenet_class(*index),
                    Some(*name),
                    "{category}: index {index}"
                );
            }
        }
    }

    #[test]
    fn no_class_is_in_two_categories_and_every_category_is_a_rules_key() {
        let mut seen = HashSet::new();
        for (category, classes) in MAPPING {
            assert!(CATEGORIES.contains(category), "{category}");
            for (index, _) in *classes {
                assert!(seen.insert(*index), "class {index} mapped twice");
            }
        }
        let mapped: HashSet<&str> = MAPPING.iter().map(|(c, _)| *c).collect();
        for category in CATEGORIES.iter().copied() {
            assert!(
                category == UNKNOWN || mapped.contains(category),
                "{category}"
            );
        }
    }

    #[test]
    fn categories_add_up_their_classes_and_fall_back_to_unknown() {
        let mut probs = vec![0.0f32; 1000];
        // Split over two glass classes, each alone under the bar.
        probs[440] = 0.2;
        probs[907] = 0.15;
        probs[737] = 0.3; // pop bottle
        probs[281] = 0.35; // tabby: counts for nothing
        let (category, confidence) = categorize(&probs, DEFAULT_THRESHOLD);
        assert_eq!(category, "glass");
        assert!((confidence - 0.35).abs() < 1e-6);
        assert_eq!(category_of(440), Some("glass"));
        assert_eq!(category_of(281), None);

        let (category, confidence) = categorize(&probs, 0.5);
        assert_eq!(category, UNKNOWN);
        assert!((confidence - 0.35).abs() < 1e-6);
    }
}
