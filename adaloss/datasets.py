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
import math
import os
import pickle
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zlib
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
MNIST_SIZES = {  # bytes of each decompressed official file
    "train-images-idx3-ubyte": 47040016, "train-labels-idx1-ubyte": 60008,
    "t10k-images-idx3-ubyte": 7840016, "t10k-labels-idx1-ubyte": 10008,
}
MAX_IDX_BYTES = 1 << 30   # an IDX file whose header declares more is refused
MAX_CIFAR_BATCH_BYTES = 64 << 20   # an official python batch has 31,035,704 bytes
DOWNLOAD_TIMEOUT = 10.0   # seconds to connect, and to wait for each chunk
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
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as response:
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
    """Try each mirror, saying which on stderr; the last error's text, or None
    on success. A silent mirror costs DOWNLOAD_TIMEOUT seconds."""
    error = None
    for url in urls:
        print(f"adaloss: downloading {url}", file=sys.stderr, flush=True)
        try:
            download(url, dest, md5)
            return None
        except (urllib.error.URLError, OSError, DataError, TimeoutError) as exc:
            error = f"{url}: {exc}"
            print(f"adaloss: {error}", file=sys.stderr, flush=True)
    return error


# ------------------------------------------------------------------ MNIST

def _read_idx(path: Path, size: int | None = None) -> tuple[bytes, str]:
    """The decompressed bytes of an IDX file and their MD5, read in chunks and
    hashed as read. Never more than `size` bytes (the official file's size) or,
    without it, than the header declares (at most MAX_IDX_BYTES) are read: a
    gzip bomb stops there with a DataError."""
    opener = gzip.open if path.suffix == ".gz" else open
    digest, total = hashlib.md5(), 0
    try:
        with opener(path, "rb") as fh:
            header = fh.read(4)
            limit = size
            if len(header) == 4 and header[:3] == b"\0\0\x08" and header[3] >= 1:
                header += fh.read(4 * header[3])
                dims = [int.from_bytes(header[4 + 4 * i:8 + 4 * i], "big")
                        for i in range(header[3])]
                declared = len(header) + math.prod(dims)
                if size is None and declared > MAX_IDX_BYTES:
                    raise DataError(f"{path}: the IDX header declares shape {tuple(dims)}, "
                                    f"{declared} bytes; expected at most {MAX_IDX_BYTES}")
                limit = declared if size is None else size
            digest.update(header)
            chunks, total = [header], len(header)
            while limit is not None and total <= limit:
                chunk = fh.read(min(1 << 20, limit + 1 - total))
                if not chunk:
                    break
                digest.update(chunk)
                chunks.append(chunk)
                total += len(chunk)
    except DataError:
        raise
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({exc}); the file is damaged, delete it") from exc
    except MemoryError as exc:
        raise DataError(f"{path}: out of memory reading {total} bytes") from exc
    if limit is not None and total > limit:
        what = "the official file's size" if size is not None else "what its header declares"
        raise DataError(f"{path}: more than {limit} bytes, {what}; the file is damaged or not "
                        "an MNIST file (a gzip bomb?), delete it")
    return b"".join(chunks), digest.hexdigest()


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
            data, md5 = _read_idx(cand, MNIST_SIZES[name] if verify else None)
            if verify and md5 != raw_md5:
                raise DataError(f"{cand}: MD5 of the decompressed file is {md5}, expected "
                                f"{raw_md5}; the file is damaged or not the official one. Delete "
                                "it (it is downloaded again)")
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
                        "damaged or not the official one. Delete the folder (it is downloaded "
                        "again)")


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


def _cifar_array(subtype, shape, dtype):
    """numpy's _reconstruct, only as ndarray pickles call it (an empty ndarray
    that __setstate__ then fills from the pickled bytes)."""
    if subtype is not _NDARRAY or tuple(shape) != (0,):
        raise pickle.UnpicklingError("_reconstruct: only an empty numpy.ndarray is allowed")
    return _RECONSTRUCT(np.ndarray, (0,), dtype)


def _latin1(text, encoding):
    """_codecs.encode as Python 3 protocol-2 pickles use it for bytes."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError("_codecs.encode: only latin1 text is allowed")
    return text.encode("latin1")


_NDARRAY = object()   # numpy.ndarray as an argument of _reconstruct, never called
_RECONSTRUCT = np.zeros(0).__reduce__()[0]        # numpy's own, under its current name
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]     # used by protocol-5 pickles
CIFAR_PICKLE_GLOBALS = {  # all a CIFAR-10 python batch needs (official: the first three)
    ("numpy.core.multiarray", "_reconstruct"): _cifar_array,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): np.dtype,
    ("numpy._core.multiarray", "_reconstruct"): _cifar_array,   # written by NumPy 2
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("_codecs", "encode"): _latin1,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR-10 python batch holds and nothing else: dicts,
    lists, byte strings, ints and NumPy arrays. Any other global (the function or
    class a hostile pickle calls to run code) is refused, so no foreign code
    runs, whether or not the MD5 was checked."""

    def find_class(self, module, name):
        try:
            return CIFAR_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is forbidden in a CIFAR-10 "
                                         "batch: a pickle that calls it could run code") from None


def _load_cifar_batch(path: Path) -> dict:
    """A CIFAR-10 python batch, through the restricted unpickler."""
    if path.stat().st_size > MAX_CIFAR_BATCH_BYTES:
        raise DataError(f"{path}: {path.stat().st_size} bytes, expected a CIFAR-10 python batch "
                        f"of about 31 MB (at most {MAX_CIFAR_BATCH_BYTES})")
    with open(path, "rb") as fh:
        batch = _CifarUnpickler(fh, encoding="bytes").load()
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    return batch


def _cifar_py(folder: Path, verify: bool):
    parts = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        path = folder / name
        if not path.exists():
            raise DataError(f"{path} is missing")
        _check_known(path, CIFAR_PY_MD5[name], verify)
        try:
            batch = _load_cifar_batch(path)
            data = np.asarray(batch[b"data"], np.uint8)
            labels = np.asarray(batch[b"labels"], np.int64)
        except DataError:
            raise
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

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}   # 16-bit grayscale PNG
_GRAY_MODES = {"1", "L", "LA"} | _SIXTEEN_BIT_MODES
_IMAGE_MODES = _GRAY_MODES | {"P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}


def _read_image(f: Path, Image, grayscale: bool | None, size: tuple | None) -> np.ndarray:
    """One PNG or JPEG file as (C, H, W) uint8. 16-bit grayscale keeps its top
    byte (value >> 8, so 65535 -> 255 and contrast is kept, not clipped)."""
    try:
        with Image.open(f) as img:
            img.load()
            mode = img.mode
            if mode not in _IMAGE_MODES:
                raise DataError(f"{f}: image mode {mode!r} is not supported; expected 8- or 16-bit "
                                "grayscale, palette or RGB(A)")
            if mode in _SIXTEEN_BIT_MODES:
                wide = np.asarray(img)
                if wide.size and (wide.min() < 0 or wide.max() > 65535):
                    raise DataError(f"{f}: image mode {mode!r} with values outside 0..65535; "
                                    "expected 8- or 16-bit grayscale")
                img = Image.fromarray((wide.astype(np.uint32) >> 8).astype(np.uint8))
            gray = grayscale if grayscale is not None else mode in _GRAY_MODES
            img = img.convert("L" if gray else "RGB")
            if size is not None:
                img = img.resize((size[1], size[0]))
            arr = np.asarray(img, np.uint8)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"{f}: {exc} Expected small images; if this file is trusted, raise "
                        "PIL.Image.MAX_IMAGE_PIXELS") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # Pillow's damaged-file errors
        raise DataError(f"{f}: cannot read the image ({exc}); expected a complete PNG or JPEG "
                        "file: it is truncated or damaged, replace or delete it") from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_image_folder(path, size: tuple | None = None, grayscale: bool | None = None):
    """A folder per class of PNG/JPEG files: (images (N, C, H, W) uint8, labels
    (N,) int64, class names sorted). Needs Pillow. All images must share a size
    unless `size=(H, W)` resizes them, and a channel count unless `grayscale`
    (True: one channel, False: RGB) converts them; by default grayscale files
    give one channel. 16-bit grayscale PNGs are scaled to 8 bits by >> 8."""
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
    images, labels, first = [], [], None
    for label, cls in enumerate(classes):
        for f in sorted((folder / cls).iterdir()):
            if f.suffix.lower() not in {".png", ".jpg", ".jpeg"}:
                continue
            arr = _read_image(f, Image, grayscale, size)
            if images and arr.shape[0] != images[0].shape[0]:
                raise DataError(f"{f}: {arr.shape[0]} channel(s), expected {images[0].shape[0]} "
                                f"as in {first}; pass grayscale=True or grayscale=False to "
                                "convert all images to one")
            if images and arr.shape != images[0].shape:
                raise DataError(f"{f}: {arr.shape[1]}x{arr.shape[2]} pixels, expected "
                                f"{images[0].shape[1]}x{images[0].shape[2]} as in {first}; pass "
                                "size=(H, W) to resize all images")
            first = first or f
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
