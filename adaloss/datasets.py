"""MNIST and CIFAR-10 in their official formats, and image folders.

``root`` defaults to ``$ADALOSS_DATA``, else the user cache folder
(``$XDG_CACHE_HOME/adaloss`` or ``~/.cache/adaloss``). A root holds ``mnist/``
(the four IDX files, gzipped or not) and ``cifar-10-batches-bin/`` or
``cifar-10-batches-py/``. Missing files are downloaded from the official hosts
(with mirrors, resumable, checksum-verified, written to a temporary file and
renamed); offline, the error says which files to put where.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Dataset", "DataError", "load_mnist", "load_cifar10", "load_image_folder",
           "default_root", "subset"]

MNIST_FILES = {
    # name: (md5 of the decompressed file, md5 of the official .gz)
    "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", "d53e105ee54ea40749a09fcbcd1e9432"),
    "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", "9fb629c4189551a2d022fa330f9573f3"),
    "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", "ec29112dd5afa0611ce80d1b7f02629c"),
}
MNIST_MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/",
                 "http://yann.lecun.com/exdb/mnist/"]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]
CIFAR_ARCHIVES = {  # folder: (url, md5 of the archive)
    "cifar-10-batches-bin": ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                             "c32a1d4ab5d03f1284b67883e8d87530"),
    "cifar-10-batches-py": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                            "c58f30108f718f92721af3b95e74349a"),
}
CIFAR_PY_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
MANIFEST = "adaloss-manifest.txt"  # md5s we recorded when we extracted an archive


class DataError(RuntimeError):
    """A data set is missing, truncated or fails its checksum."""


@dataclass
class Dataset:
    """Images (N, C, H, W) uint8 and labels (N,) int64 for train and test."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list = field(default_factory=list)
    name: str = ""

    def __iter__(self):
        """Deprecated: (x_train, y_train), (x_test, y_test), classes; use the fields."""
        warnings.warn("unpacking a Dataset is deprecated; use its fields (train_images, "
                      "train_labels, test_images, test_labels, classes)", DeprecationWarning,
                      stacklevel=2)
        yield self.train_images, self.train_labels
        yield self.test_images, self.test_labels
        yield self.classes


def default_root() -> Path:
    env = os.environ.get("ADALOSS_DATA")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "adaloss"


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve_root(root) -> Path:
    if root is None:
        return default_root()
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root: expected a path, got {type(root).__name__}")
    return Path(root).expanduser()


# ------------------------------------------------------------------ download

def download(url: str, dest: Path, md5: str | None = None, progress: bool = True) -> Path:
    """Fetch url into dest: resumable into dest.part, verified, then renamed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        if have and response.status != 206:  # the server ignored the range
            have = 0
        total = response.headers.get("Content-Length")
        total = int(total) + have if total else None
        bar = None
        if progress:
            from tqdm.auto import tqdm  # deferred on purpose: only for a download's progress

            bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name)
        with open(part, "ab" if have else "wb") as fh:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                fh.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        if bar is not None:
            bar.close()
    if md5 is not None and _md5_file(part) != md5:
        part.unlink()
        raise DataError(f"{url}: the download's MD5 is not {md5}; it was deleted, try again")
    os.replace(part, dest)
    return dest


def _fetch(urls: list, dest: Path, md5: str | None) -> str | None:
    """Try each mirror; the last error's text, or None on success."""
    error = None
    for url in urls:
        try:
            download(url, dest, md5)
            return None
        except (urllib.error.URLError, OSError, DataError, TimeoutError) as exc:
            error = f"{url}: {exc}"
    return error


# ------------------------------------------------------------------ MNIST

def _read_idx(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read ({exc}); the file is damaged, delete it") from exc


def parse_idx(data: bytes, path: Path | str = "<bytes>") -> np.ndarray:
    """An IDX file (the MNIST format) as a uint8 array."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim < 1 or len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    size = int(np.prod(dims))
    if len(data) != header + size:
        raise DataError(f"{path}: expected {header + size} bytes for shape {tuple(dims)}, found "
                        f"{len(data)} (truncated or damaged); delete it and load again")
    return np.frombuffer(data, np.uint8, size, header).reshape(dims)


def _mnist_file(folder: Path, name: str, verify: bool, download_ok: bool) -> np.ndarray:
    raw_md5, gz_md5 = MNIST_FILES[name]
    for cand in (folder / name, folder / (name + ".gz")):
        if cand.exists():
            data = _read_idx(cand)
            if verify and _md5(data) != raw_md5:
                raise DataError(f"{cand}: MD5 of the decompressed file is {_md5(data)}, expected "
                                f"{raw_md5}; the file is damaged or not the official one. Delete "
                                "it (it is downloaded again) or pass verify=False")
            return parse_idx(data, cand)
    dest = folder / (name + ".gz")
    error = "download=False"
    if download_ok:
        error = _fetch([m + name + ".gz" for m in MNIST_MIRRORS], dest, gz_md5)
        if error is None:
            return _mnist_file(folder, name, verify, False)
    raise DataError(
        f"MNIST file {name} is not in {folder} and could not be downloaded ({error}).\n"
        f"Put the four official files there (gzipped or not): "
        f"{', '.join(n + '.gz' for n in MNIST_FILES)}, or set ADALOSS_DATA to a folder "
        "that holds mnist/.")


def load_mnist(root=None, download: bool = True, verify: bool = True) -> Dataset:
    """The official MNIST: 60,000 train and 10,000 test images (N, 1, 28, 28) uint8."""
    folder = _resolve_root(root) / "mnist"
    arrays = {n: _mnist_file(folder, n, verify, download) for n in MNIST_FILES}
    out = []
    for split in ("train", "t10k"):
        images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{folder}: {split} images {images.shape} and labels {labels.shape} "
                            "do not match")
        out += [np.ascontiguousarray(images[:, None]), labels.astype(np.int64)]
    return Dataset(*out, classes=[str(i) for i in range(10)], name="mnist")


# ------------------------------------------------------------------ CIFAR-10

def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.exists():
        return {}
    entries = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(None, 1)
            entries[name] = digest
    return entries


def _check_known(path: Path, expected: str | None, verify: bool) -> None:
    if verify and expected is not None and _md5_file(path) != expected:
        raise DataError(f"{path}: MD5 is {_md5_file(path)}, expected {expected}; the file is "
                        "damaged. Delete the folder (it is downloaded again) or pass verify=False")


def _cifar_bin(folder: Path, verify: bool):
    manifest = _read_manifest(folder)
    parts = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        path = folder / f"{name}.bin"
        if not path.exists():
            raise DataError(f"{path} is missing")
        _check_known(path, manifest.get(path.name), verify)
        raw = np.fromfile(path, np.uint8)
        if raw.size != 10000 * 3073:
            raise DataError(f"{path}: expected {10000 * 3073} bytes (10,000 records of 3,073), "
                            f"found {raw.size}; the file is truncated or damaged")
        records = raw.reshape(10000, 3073)
        labels = records[:, 0].astype(np.int64)
        if labels.max() > 9:
            raise DataError(f"{path}: label byte {labels.max()} is not a CIFAR-10 class")
        parts[name] = (records[:, 1:].reshape(10000, 3, 32, 32), labels)
    return parts


def _cifar_py(folder: Path, verify: bool):
    parts = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        path = folder / name
        if not path.exists():
            raise DataError(f"{path} is missing")
        _check_known(path, CIFAR_PY_MD5[name], verify)
        try:
            with open(path, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            data = np.asarray(batch[b"data"], np.uint8)
            labels = np.asarray(batch[b"labels"], np.int64)
        except Exception as exc:  # a damaged pickle raises many kinds of errors
            raise DataError(f"{path}: not a CIFAR-10 python batch ({exc})") from exc
        if data.shape != (10000, 3072) or labels.shape != (10000,) or labels.max() > 9:
            raise DataError(f"{path}: expected 10,000 images of 3,072 bytes with labels 0..9")
        parts[name] = (data.reshape(10000, 3, 32, 32), labels)
    return parts


def _extract(archive: Path, root: Path) -> None:
    """Extract into a temporary folder beside the target, record md5s, rename."""
    with tempfile.TemporaryDirectory(dir=root) as tmp, tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and ".." not in m.name]
        tar.extractall(tmp, members=members)
        for sub in Path(tmp).iterdir():
            lines = [f"{_md5_file(f)}  {f.name}" for f in sorted(sub.iterdir()) if f.is_file()]
            (sub / MANIFEST).write_text("\n".join(lines) + "\n")
            target = root / sub.name
            if not target.exists():
                os.replace(sub, target)


def load_cifar10(root=None, download: bool = True, verify: bool = True) -> Dataset:
    """CIFAR-10: 50,000 train and 10,000 test images (N, 3, 32, 32) uint8, from
    the binary or the python version of the official archive."""
    base = _resolve_root(root)
    parts = None
    if (base / "cifar-10-batches-bin").is_dir():
        parts = _cifar_bin(base / "cifar-10-batches-bin", verify)
    elif (base / "cifar-10-batches-py").is_dir():
        parts = _cifar_py(base / "cifar-10-batches-py", verify)
    else:
        error = "download=False"
        if download:
            url, md5 = CIFAR_ARCHIVES["cifar-10-batches-bin"]
            archive = base / "cifar-10-binary.tar.gz"
            error = _fetch([url], archive, md5)
            if error is None:
                _extract(archive, base)
                archive.unlink()
                return load_cifar10(base, download=False, verify=verify)
        raise DataError(
            f"CIFAR-10 is not in {base} and could not be downloaded ({error}).\n"
            "Extract the official binary archive (cifar-10-binary.tar.gz) or python archive "
            f"(cifar-10-python.tar.gz) there, giving {base}/cifar-10-batches-bin/ or "
            f"{base}/cifar-10-batches-py/, or set ADALOSS_DATA to a folder that holds one.")
    train = [parts[f"data_batch_{i}"] for i in range(1, 6)]
    return Dataset(np.ascontiguousarray(np.concatenate([t[0] for t in train])),
                   np.concatenate([t[1] for t in train]),
                   np.ascontiguousarray(parts["test_batch"][0]), parts["test_batch"][1],
                   classes=list(CIFAR_CLASSES), name="cifar10")


# ------------------------------------------------------------------ folders

def load_image_folder(path, size: tuple | None = None, grayscale: bool | None = None):
    """A folder per class of PNG/JPEG files: (images (N, C, H, W) uint8, labels
    (N,) int64, class names sorted). Needs Pillow. All images must share a size
    unless `size=(H, W)` resizes them."""
    try:
        from PIL import Image  # deferred on purpose: Pillow is optional (adaloss[images])
    except ImportError as exc:
        raise ImportError("load_image_folder needs Pillow: pip install 'adaloss[images]'") from exc
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"path: {folder} is not a folder")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"path: {folder} has no class folders")
    images, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((folder / cls).iterdir()):
            if f.suffix.lower() not in {".png", ".jpg", ".jpeg"}:
                continue
            with Image.open(f) as img:
                mode = "L" if (grayscale if grayscale is not None else img.mode in ("L", "1")) else "RGB"
                img = img.convert(mode)
                if size is not None:
                    img = img.resize((size[1], size[0]))
                arr = np.asarray(img, np.uint8)
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            if images and arr.shape != images[0].shape:
                raise DataError(f"{f}: shape {arr.shape} differs from {images[0].shape}; pass size=")
            images.append(arr)
            labels.append(label)
    if not images:
        raise DataError(f"path: {folder} has no PNG or JPEG files")
    return np.stack(images), np.array(labels, np.int64), classes


def subset(data: Dataset, train: int | None = None, test: int | None = None,
           seed: int = 0) -> Dataset:
    """A random, class-mixed subset (for quick runs and tests)."""
    rng = np.random.default_rng(seed)

    def pick(x, y, n):
        if n is None or n >= len(y):
            return x, y
        idx = np.sort(rng.permutation(len(y))[:n])
        return np.ascontiguousarray(x[idx]), y[idx]

    tr = pick(data.train_images, data.train_labels, train)
    te = pick(data.test_images, data.test_labels, test)
    return Dataset(*tr, *te, classes=data.classes, name=data.name)
