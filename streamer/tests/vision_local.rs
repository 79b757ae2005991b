//! The embedded EfficientNet-Lite0 on real photos, against the independent
//! numpy reference (`tests/fixtures/vision/reference.json`, made by
//! `scripts/efficientnet_reference.py`), and its waste categories and errors.
//!
//! Needs the converted weights: `scripts/setup.sh` writes them to
//! `.data/models/efficientnet-lite0.safetensors` (or `VISION_LOCAL_MODEL`).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use candle_core::{Device, Tensor};
use streamer::vision::{
    PreparedImage, Vision as _,
    local::{LocalVision, MODEL_NAME, imagenet_class},
    waste,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn model_path() -> PathBuf {
    std::env::var_os("VISION_LOCAL_MODEL").map_or_else(
        || testkit::data_dir().join("models/efficientnet-lite0.safetensors"),
        PathBuf::from,
    )
}

fn model() -> &'static LocalVision {
    static MODEL: OnceLock<LocalVision> = OnceLock::new();
    MODEL.get_or_init(|| {
        LocalVision::load(&model_path(), waste::DEFAULT_THRESHOLD)
            .expect("the image model (run scripts/setup.sh first)")
    })
}

fn photo(name: &str) -> image::RgbImage {
    image::open(fixtures().join("images").join(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .to_rgb8()
}

fn prepared(name: &str) -> PreparedImage {
    let path = fixtures().join("images").join(name);
    PreparedImage {
        rgb: Arc::new(photo(name)),
        jpeg: std::fs::read(path).unwrap().into(),
    }
}

/// A file in a fresh directory of its own under the system temp dir.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "vision-local-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn top5_matches_the_numpy_reference() {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("vision/reference.json")).unwrap(),
    )
    .unwrap();
    let images = reference["images"].as_array().unwrap();
    assert!(images.len() >= 3);
    for entry in images {
        let name = entry["image"].as_str().unwrap();
        let expected: Vec<(usize, f64)> = entry["top5"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let index = usize::try_from(t["index"].as_u64().unwrap()).unwrap();
                assert_eq!(imagenet_class(index), t["label"].as_str());
                (index, t["prob"].as_f64().unwrap())
            })
            .collect();
        let got = model().top_k(&photo(name), 5).unwrap();
        let indices: Vec<usize> = got.iter().map(|(i, _)| *i).collect();
        let want: Vec<usize> = expected.iter().map(|(i, _)| *i).collect();
        assert_eq!(indices, want, "{name}: top-5 classes");
        let mut worst = 0f64;
        for ((index, prob), (_, want)) in got.iter().zip(&expected) {
            let diff = (f64::from(*prob) - want).abs();
            worst = worst.max(diff);
            assert!(
                diff < 1e-3,
                "{name}: class {index} has {prob}, reference {want} (diff {diff})"
            );
        }
        eprintln!("{name}: top-5 as the reference, largest probability difference {worst:.1e}");
    }
}

#[tokio::test]
async fn a_cup_of_coffee_is_general_waste() {
    let classification = model().classify(&prepared("coffee.jpg")).await.unwrap();
    // Espresso, cup and coffee mug all count for `general` (ceramic cup and
    // coffee grounds); see docs/vision.md.
    assert_eq!(classification.category, "general");
    assert!(
        classification.confidence > 0.9,
        "{}",
        classification.confidence
    );
    assert_eq!(classification.labels.len(), 5);
    assert_eq!(classification.labels[0].label, "espresso");
    assert!(
        classification
            .labels
            .windows(2)
            .all(|w| w[0].score >= w[1].score)
    );
    assert_eq!(classification.model, MODEL_NAME);
    assert_eq!(model().name(), MODEL_NAME);
}

#[tokio::test]
async fn things_that_are_not_waste_items_are_unknown() {
    // The model is sure these are a cat and a missile; neither maps to a
    // waste category, so nothing reaches the threshold.
    for name in ["chelsea.png", "rocket.jpg"] {
        let classification = model().classify(&prepared(name)).await.unwrap();
        assert_eq!(classification.category, "unknown", "{name}");
        assert!(classification.confidence < waste::DEFAULT_THRESHOLD);
        assert!(classification.labels[0].score > 0.3, "{name}");
    }
}

#[tokio::test]
async fn a_plain_grey_image_is_unknown() {
    let grey = image::RgbImage::from_pixel(640, 480, image::Rgb([128, 128, 128]));
    let image = PreparedImage {
        rgb: Arc::new(grey),
        jpeg: bytes::Bytes::new(),
    };
    let classification = model().classify(&image).await.unwrap();
    assert_eq!(classification.category, "unknown");
    assert!(classification.confidence < waste::DEFAULT_THRESHOLD);
}

#[test]
fn a_missing_model_file_names_the_path() {
    let path = scratch("nowhere.safetensors");
    let error = LocalVision::load(&path, 0.25).err().unwrap();
    let message = format!("{error:#}");
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("not found"), "{message}");
}

#[test]
fn a_garbage_model_file_names_the_path() {
    let path = scratch("garbage.safetensors");
    std::fs::write(&path, b"this is not a safetensors file at all").unwrap();
    let error = LocalVision::load(&path, 0.25).err().unwrap();
    let message = format!("{error:#}");
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("not a readable safetensors"), "{message}");
}

#[test]
fn safetensors_of_another_network_are_refused() {
    let zeros = |shape: &[usize]| Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu);

    let path = scratch("other.safetensors");
    let tensors = HashMap::from([("fc.weight".to_owned(), zeros(&[10, 4]).unwrap())]);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let message = format!("{:#}", LocalVision::load(&path, 0.25).err().unwrap());
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(
        message.contains("`_conv_stem.weight` is missing"),
        "{message}"
    );

    let path = scratch("narrow.safetensors");
    let tensors = HashMap::from([(
        "_conv_stem.weight".to_owned(),
        zeros(&[16, 3, 3, 3]).unwrap(),
    )]);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let message = format!("{:#}", LocalVision::load(&path, 0.25).err().unwrap());
    assert!(message.contains("has shape [16, 3, 3, 3]"), "{message}");
}

#[test]
fn the_threshold_must_be_a_probability() {
    let error = LocalVision::load(&model_path(), 1.5).err().unwrap();
    assert!(error.to_string().contains("threshold"), "{error}");
}
