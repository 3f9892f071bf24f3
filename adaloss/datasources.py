"""Any data set by a name or a path: what ``--dataset`` accepts.

``load_any(spec, root)`` resolves

- ``"mnist"`` / ``"cifar10"``: the official files under `root`, checksum-verified
  (``adaloss.datasets.load_mnist`` / ``load_cifar10``);
- a folder of IDX files, any data set in MNIST's format:
  ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each gzipped
  (``.gz``) or not; images ``(N, H, W)`` (grey) or ``(N, C, H, W)`` (an
  ``idx4`` file);
- an image folder: ``PATH/train`` and ``PATH/test`` each with one sub-folder
  per class (the same class names in both), or ``PATH`` itself with one
  sub-folder per class, split into train and test by a seeded
  ``test_fraction`` per class;
- an ``.npz`` file with ``x_train, y_train, x_test, y_test``: images uint8 as
  ``(N, H, W)`` (grey), ``(N, C, H, W)`` when the second axis has 1 or 3
  entries and the last does not, else ``(N, H, W, C)``; labels integers
  ``0..C-1``. Read with ``allow_pickle=False``.

Shapes, channels and the number of classes come from the data. Bad data
raises ``DataError`` naming the file: images of mixed sizes, an unreadable
image, a single class, labels outside ``0..C-1`` (or a class with no training
image), images and labels of different lengths. User data carries no
checksum: ``data_info`` says so for the results file.
"""
from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import numpy as np

from .datasets import DataError, Dataset, load_cifar10, load_mnist, parse_idx

__all__ = ["load_any", "data_info", "dataset_name", "UnknownDataset", "load_idx_folder",
           "load_image_split", "load_npz",
           "OFFICIAL", "IDX_FILES"]

OFFICIAL = ("mnist", "cifar10")
IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class UnknownDataset(DataError, ValueError):
    """A ``--dataset`` that is neither a known name nor an existing path (a
    ValueError too, as ``runs.load_data`` raised for unknown names before)."""


def _name(path: Path) -> str:
    """A data set's name from its path, fit for run names and file names."""
    stem = path.name[:-4] if path.name.endswith(".npz") else path.name
    name = re.sub(r"[^A-Za-z0-9_.]+", "_", stem).strip("_.") or "data"
    return name + "-user" if name in OFFICIAL else name


def _check_labels(labels: np.ndarray, where: str, num_classes: int | None = None) -> np.ndarray:
    if labels.ndim != 1:
        raise DataError(f"{where}: expected a 1-D array of labels, got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{where}: expected integer labels, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if len(labels) and labels.min() < 0:
        raise DataError(f"{where}: labels must be 0..C-1, found {int(labels.min())}")
    if num_classes is not None and len(labels) and labels.max() >= num_classes:
        raise DataError(f"{where}: label {int(labels.max())} is not one of the {num_classes} "
                        f"classes 0..{num_classes - 1} of the training labels")
    return labels


def _finish(x_train, y_train, x_test, y_test, where: dict, name: str,
            classes: list | None = None) -> Dataset:
    """Check a data set's four arrays (naming the file of each) and make the Dataset."""
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise DataError(f"{where[split + '_images']} and {where[split + '_labels']}: "
                            f"{len(x)} images but {len(y)} labels")
        if len(x) == 0:
            raise DataError(f"{where[split + '_images']}: no {split} images")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{where['test_images']}: test images of shape {x_test.shape[1:]}, "
                        f"training images {x_train.shape[1:]} ({where['train_images']}); "
                        "every image must have the same size and channels")
    if x_train.shape[1] not in (1, 3):
        raise DataError(f"{where['train_images']}: images with {x_train.shape[1]} channels; "
                        "expected 1 (grey) or 3 (RGB)")
    y_train = _check_labels(y_train, where["train_labels"])
    present = np.unique(y_train)
    num_classes = int(y_train.max()) + 1
    if len(present) < 2:
        raise DataError(f"{where['train_labels']}: one class only ({int(present[0])}); "
                        "training needs at least 2")
    if len(present) != num_classes:
        missing = sorted(set(range(num_classes)) - set(present.tolist()))
        raise DataError(f"{where['train_labels']}: labels must be 0..C-1 with every class "
                        f"present; classes {missing[:10]} have no training image")
    y_test = _check_labels(y_test, where["test_labels"], num_classes)
    return Dataset(np.ascontiguousarray(x_train, np.uint8), y_train,
                   np.ascontiguousarray(x_test, np.uint8), y_test,
                   classes=classes or [str(i) for i in range(num_classes)], name=name)


# ------------------------------------------------------------------ IDX

def _idx_path(folder: Path, base: str) -> Path:
    for cand in (folder / base, folder / (base + ".gz")):
        if cand.exists():
            return cand
    raise DataError(f"{folder / base}: missing (an IDX folder holds "
                    f"{', '.join(IDX_FILES.values())}, each gzipped (.gz) or not)")


def _read_bytes(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc


def load_idx_folder(path) -> Dataset:
    """A data set in MNIST's IDX format (see the module's docstring)."""
    folder = Path(path)
    files = {key: _idx_path(folder, base) for key, base in IDX_FILES.items()}
    arrays = {key: parse_idx(_read_bytes(p), p) for key, p in files.items()}
    for key in ("train_images", "test_images"):
        x = arrays[key]
        if x.ndim == 3:
            arrays[key] = x[:, None]
        elif x.ndim != 4:
            raise DataError(f"{files[key]}: expected images (N, H, W) or (N, C, H, W), got "
                            f"shape {x.shape}")
    return _finish(arrays["train_images"], arrays["train_labels"], arrays["test_images"],
                   arrays["test_labels"], {k: str(v) for k, v in files.items()}, _name(folder))


# ------------------------------------------------------------------ images

def _class_folders(folder: Path) -> list:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{folder}: no class folders (expected one sub-folder per class)")
    return classes


def _read_images(folder: Path, classes: list) -> tuple:
    """(images (N, C, H, W) uint8, labels, the file of each image) of class folders."""
    try:
        from PIL import Image, UnidentifiedImageError  # deferred on purpose: Pillow is optional
    except ImportError as exc:
        raise ImportError("image folders need Pillow: pip install 'adaloss[images]'") from exc
    images, labels, files = [], [], []
    for label, cls in enumerate(classes):
        sub = folder / cls
        if not sub.is_dir():
            raise DataError(f"{sub}: missing (the class folders of {folder} must match those "
                            f"of the training folder: {classes})")
        for f in sorted(sub.iterdir()):
            if f.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as img:
                    grey = img.mode in ("L", "1", "I;16", "I")
                    img = img.convert("L" if grey else "RGB")
                    arr = np.asarray(img, np.uint8)
            except (OSError, UnidentifiedImageError, ValueError) as exc:
                raise DataError(f"{f}: unreadable image ({exc})") from exc
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            if images and arr.shape != images[0].shape:
                raise DataError(f"{f}: image of shape (C, H, W) = {arr.shape}, but {files[0]} "
                                f"is {images[0].shape}; every image must have the same size "
                                "and mode (resize them first)")
            images.append(arr)
            labels.append(label)
            files.append(f)
    if not images:
        raise DataError(f"{folder}: no PNG or JPEG files in its class folders")
    return np.stack(images), np.array(labels, np.int64), files


def _check_fraction(test_fraction) -> float:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction: expected a number strictly between 0 and 1, got "
                         f"{test_fraction!r}")
    return float(test_fraction)


def load_image_split(path, test_fraction: float | None = None, seed: int = 0) -> Dataset:
    """An image folder (see the module's docstring): ``PATH/train`` and
    ``PATH/test``, or class folders split by `test_fraction` (seeded, per class:
    at least one training image per class)."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    train_dir, test_dir = folder / "train", folder / "test"
    if train_dir.is_dir() and test_dir.is_dir():
        classes = _class_folders(train_dir)
        test_classes = _class_folders(test_dir)
        if sorted(set(test_classes) - set(classes)):
            raise DataError(f"{test_dir}: class folders {sorted(set(test_classes) - set(classes))} "
                            f"are not in {train_dir}")
        x_tr, y_tr, files = _read_images(train_dir, classes)
        x_te, y_te, test_files = _read_images(test_dir, [c for c in classes
                                                         if (test_dir / c).is_dir()])
        # test labels follow the training folder's class order
        te_names = [c for c in classes if (test_dir / c).is_dir()]
        y_te = np.array([classes.index(te_names[i]) for i in y_te], np.int64)
        if x_tr.shape[1:] != x_te.shape[1:]:
            raise DataError(f"{test_files[0]}: test images of shape {x_te.shape[1:]}, training "
                            f"images {x_tr.shape[1:]} ({files[0]}); resize them to one size")
        where = {"train_images": str(train_dir), "train_labels": str(train_dir),
                 "test_images": str(test_dir), "test_labels": str(test_dir)}
        return _finish(x_tr, y_tr, x_te, y_te, where, _name(folder), classes)
    if test_fraction is None:
        raise DataError(f"{folder}: has no train/ and test/ folders; give test_fraction "
                        "(--test-fraction, e.g. 0.2) to split its class folders")
    fraction = _check_fraction(test_fraction)
    classes = _class_folders(folder)
    x, y, _ = _read_images(folder, classes)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in range(len(classes)):
        idx = np.nonzero(y == c)[0]
        n_test = min(int(round(fraction * len(idx))), len(idx) - 1)
        test[rng.permutation(idx)[:n_test]] = True
    if not test.any():
        raise DataError(f"{folder}: test_fraction {fraction} leaves no test image; give more "
                        "images or a larger fraction")
    where = dict.fromkeys(("train_images", "train_labels", "test_images", "test_labels"),
                          str(folder))
    return _finish(x[~test], y[~test], x[test], y[test], where, _name(folder), classes)


# ------------------------------------------------------------------ npz

def _npz_images(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype != np.uint8:
        raise DataError(f"{where}: expected uint8 images (0..255), got dtype {x.dtype}")
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise DataError(f"{where}: expected images (N, H, W), (N, C, H, W) or (N, H, W, C), "
                        f"got shape {x.shape}")
    if x.shape[1] in (1, 3) and x.shape[3] not in (1, 3):
        return x
    if x.shape[3] in (1, 3):
        return x.transpose(0, 3, 1, 2)
    raise DataError(f"{where}: cannot tell the channel axis of shape {x.shape}: expected 1 or "
                    "3 channels on axis 1 (NCHW) or axis 3 (NHWC)")


def load_npz(path) -> Dataset:
    """An ``.npz`` data set (see the module's docstring)."""
    path = Path(path)
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise DataError(f"{path}: missing arrays {missing}; expected {list(keys)} "
                                f"(found {npz.files})")
            arrays = {k: npz[k] for k in keys}
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as exc:   # not a zip, a pickled object array
        raise DataError(f"{path}: cannot read as an .npz of plain arrays ({exc})") from exc
    where = {f"{s}_{w}": f"{path} [{'x' if w == 'images' else 'y'}_{s}]"
             for s in ("train", "test") for w in ("images", "labels")}
    return _finish(_npz_images(arrays["x_train"], where["train_images"]), arrays["y_train"],
                   _npz_images(arrays["x_test"], where["test_images"]), arrays["y_test"],
                   where, _name(path))


# ------------------------------------------------------------------ any

def load_any(spec, root=None, test_fraction: float | None = None, seed: int = 0) -> Dataset:
    """The data set `spec` names: ``"mnist"``, ``"cifar10"`` (from `root`), or
    a path to an IDX folder, an image folder or an ``.npz`` file (the module's
    docstring gives the formats). `test_fraction` and `seed` split an image
    folder without ``train/`` and ``test/``."""
    if isinstance(spec, str) and spec in OFFICIAL:
        return load_mnist(root) if spec == "mnist" else load_cifar10(root)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"dataset: expected 'mnist', 'cifar10' or a path, got "
                        f"{type(spec).__name__}")
    path = Path(spec).expanduser()
    if not path.exists():
        raise UnknownDataset(f"dataset: {spec!r} is neither one of {OFFICIAL} nor an existing path "
                                 "(an IDX folder, an image folder or an .npz file)")
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise DataError(f"{path}: expected an .npz file, an IDX folder or an image folder")
        return load_npz(path)
    if any((path / (base + ext)).exists() for base in IDX_FILES.values() for ext in ("", ".gz")):
        return load_idx_folder(path)
    return load_image_split(path, test_fraction, seed)


def dataset_name(spec) -> str:
    """The name a data set's runs carry: ``mnist``/``cifar10``, else the file
    or folder name (``-user`` appended if it is one of those two)."""
    if isinstance(spec, str) and spec in OFFICIAL:
        return spec
    return _name(Path(spec).expanduser())


def data_info(spec, test_fraction: float | None = None) -> dict:
    """What a results file records of the data: its source and whether its
    checksum was checked (official MNIST / CIFAR-10 only)."""
    if isinstance(spec, str) and spec in OFFICIAL:
        return {"source": spec, "checksum": "verified (official files)"}
    info = {"source": str(Path(spec).expanduser().resolve()), "checksum": "not checked: user data"}
    if test_fraction is not None:
        info["test_fraction"] = float(test_fraction)
    return info
