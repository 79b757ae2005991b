//! Classifies photos with the embedded EfficientNet-Lite0 and times it.
//!
//! `cargo run --release -p streamer --example classify -- --model PATH --runs N IMAGE...`
//!
//! Prints the top-5 ImageNet classes and the waste category of each image,
//! then the median and p90 time of one classification (preprocessing and
//! inference on an already decoded image; loading the model and decoding
//! the file are not counted, as the scan pipeline does both once).

use std::{path::PathBuf, time::Instant};

use anyhow::Context as _;
use clap::Parser;
use streamer::vision::{local, waste};

#[derive(Parser)]
struct Args {
    /// The safetensors weights (scripts/setup.sh writes
    /// .data/models/efficientnet-lite0.safetensors).
    #[arg(long, env = "VISION_LOCAL_MODEL")]
    model: PathBuf,
    /// Timed classifications per image, after one untimed warm-up.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Category threshold.
    #[arg(long, default_value_t = waste::DEFAULT_THRESHOLD)]
    threshold: f64,
    /// JPEG, PNG or WebP files.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let model = local::LocalVision::load(&args.model, args.threshold)?;
    println!(
        "model loaded in {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    let mut times = Vec::new();
    for path in &args.images {
        let rgb = image::open(path)
            .with_context(|| format!("cannot decode {}", path.display()))?
            .to_rgb8();
        let probs = model.probabilities(&rgb)?;
        let (category, confidence) = waste::categorize(&probs, model.threshold());
        println!(
            "{} ({}x{}): {category} {confidence:.3}",
            path.display(),
            rgb.width(),
            rgb.height()
        );
        for (index, prob) in model.top_k(&rgb, 5)? {
            println!(
                "  {index:>4} {:<28} {prob:.4}",
                local::imagenet_class(index).unwrap_or("?")
            );
        }
        for _ in 0..args.runs {
            let started = Instant::now();
            model.top_k(&rgb, 5)?;
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    if times.is_empty() {
        return Ok(());
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((times.len() - 1) as f64 * q).round() as usize;
        times[i]
    };
    println!(
        "{} classifications: median {:.1} ms, p90 {:.1} ms, min {:.1} ms, max {:.1} ms",
        times.len(),
        at(0.5),
        at(0.9),
        times[0],
        times[times.len() - 1]
    );
    Ok(())
}
