"""Tiny synthetic data sets written in each format ``--dataset`` reads.

Each class is a random template plus noise, so one epoch learns something.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def arrays(classes: int = 6, per_class: int = 30, shape=(1, 16, 16), seed: int = 0) -> tuple:
    """(x_train, y_train, x_test, y_test): uint8 NCHW, int64 labels; a third of
    each class's images are test images."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, (classes, *shape))
    y = np.repeat(np.arange(classes), per_class)
    x = np.clip(templates[y] + rng.normal(0, 40, (len(y), *shape)), 0, 255).astype(np.uint8)
    test = np.zeros(len(y), bool)
    for c in range(classes):
        test[np.nonzero(y == c)[0][: per_class // 3]] = True
    return x[~test], y[~test], x[test], y[test]


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big")
                                                        for d in array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_idx(folder: Path, x_train, y_train, x_test, y_test, gz: bool = True) -> Path:
    """The four MNIST-named files (train images gzipped when `gz`); grey
    images are written (N, H, W) as MNIST's."""
    folder.mkdir(parents=True, exist_ok=True)
    squeeze = (lambda x: x[:, 0]) if x_train.shape[1] == 1 else (lambda x: x)
    files = {"train-images-idx3-ubyte": squeeze(x_train), "train-labels-idx1-ubyte": y_train,
             "t10k-images-idx3-ubyte": squeeze(x_test), "t10k-labels-idx1-ubyte": y_test}
    for name, arr in files.items():
        data = _idx(np.asarray(arr).astype(np.uint8))
        if gz and name.startswith("train"):
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


def _png(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
    Image.fromarray(arr).save(path)


def write_image_folder(folder: Path, x, y, names=None) -> Path:
    """One sub-folder per class of PNG files."""
    for i, (img, label) in enumerate(zip(x, y)):
        sub = folder / (names[label] if names else f"class{label}")
        sub.mkdir(parents=True, exist_ok=True)
        _png(sub / f"{i:04d}.png", img)
    return folder


def write_npz(path: Path, x_train, y_train, x_test, y_test, layout: str = "NHWC") -> Path:
    if layout == "NHWC":
        x_train, x_test = x_train.transpose(0, 2, 3, 1), x_test.transpose(0, 2, 3, 1)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path
