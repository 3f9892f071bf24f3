"""Checkpoints of a network, head and optimizer together.

Format (version 1), one file:

    bytes 0-7    b"ADALOSS\\0"
    bytes 8-11   format version, uint32 little-endian
    bytes 12-43  SHA-256 of the payload
    bytes 44-    payload: a NumPy .npz archive with the arrays
                 net/<name>, head/weight, adam/exp_avg, adam/exp_avg_sq and
                 meta, a JSON string: architecture, head settings (ArcFace's
                 margin rule, the combined head's m1, m2, m3) and running
                 statistics, Adam step and hyper-parameters, and whatever the
                 caller adds (epoch, RNG state, history).

Writes go to a temporary file in the same folder, are fsynced, then renamed
over the target, so a crash mid-save never destroys the previous checkpoint;
the next save removes temporary files a killed save left behind.

Reading trusts nothing in the file: it must be a regular file of a bounded
size; the zip member list (known names, stored, no duplicates) and each npy
header (dtype, shape, size) are checked before any data is read; then every
value is checked as the constructors check their arguments, and only then is
anything copied. Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import stat
import time
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from .fileio import atomic_write  # also importable from here, as before
from .nn import (Adam, Sequential, _check_adam_state, _check_float32_array, _check_running_stats,
                 _Head)

MAGIC = b"ADALOSS\0"
VERSION = 1
HEADER = len(MAGIC) + 4 + 32

__all__ = ["save", "load", "read", "CheckpointError", "atomic_write", "LATEST"]


class CheckpointError(ValueError):
    """A checkpoint is truncated, corrupted, of another version or architecture."""


def _architecture(net: Sequential, head: _Head) -> dict:
    settings = {"kind": head.kind, "variant": head.variant,
                "num_classes": head.num_classes, "embedding_dim": head.embedding_dim,
                "s": head.s, "m": head.m, "h": head.h, "t_alpha": head.t_alpha}
    if head.kind == "ArcFace":
        settings["rule"] = head.rule
    elif head.kind == "CombinedMargin":
        settings.update(m1=head.m1, m2=head.m2, m3=head.m3)
    return {"layers": [list(layer.spec()) for layer in net.layers],
            "input_shape": list(net.input_shape), "head": settings}


def _saved_architecture(arch):
    """The saved architecture as today's code writes it: an ArcFace saved
    before margin rules existed used the fallback rule. Anything that is not
    the expected JSON shape is returned as it is (and fails the comparison)."""
    head = arch.get("head") if isinstance(arch, dict) else None
    if isinstance(head, dict) and head.get("kind") == "ArcFace" and "rule" not in head:
        arch = {**arch, "head": {**head, "rule": "fallback"}}
    return arch


STALE_TEMP_SECONDS = 60


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files a save of `path` killed mid-write left behind
    (atomic_write's ``.<name>.XXXXXXXX.tmp``), once nobody has written to them
    for STALE_TEMP_SECONDS: a younger one may be another save in flight."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")
    now = time.time()
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        try:
            if (pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)
                    and now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS):
                os.unlink(entry.path)
        except OSError:   # gone already, or not ours to remove: the save goes on
            pass


def save(path, net: Sequential, head: _Head, optimizer: Adam, **extra) -> None:
    """Save weights, Adam moments and step, AdaFace running statistics and any
    JSON-serialisable `extra` (epoch, RNG state, history ...). Stale temporary
    files of earlier saves of the same path that were killed are removed."""
    if not isinstance(net, Sequential) or not isinstance(head, _Head) or not isinstance(optimizer, Adam):
        raise TypeError("save(path, net, head, optimizer): expected an adaloss Sequential, head "
                        "and Adam")
    _remove_stale_temporaries(Path(path))
    arrays = {f"net/{k}": v for k, v in net.state_dict().items()}
    arrays["head/weight"] = head.weight.copy()
    adam = optimizer.state_dict()
    arrays["adam/exp_avg"], arrays["adam/exp_avg_sq"] = adam["exp_avg"], adam["exp_avg_sq"]
    meta = {"architecture": _architecture(net, head),
            "optimizer": {"step": adam["step"], "lr": adam["lr"], "betas": list(optimizer.betas),
                          "eps": optimizer.eps, "weight_decay": optimizer.weight_decay,
                          "num_params": len(optimizer.params)},
            "running": ({"mean": head.running_mean, "std": head.running_std}
                        if head.has_quality else None),
            "extra": extra}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    payload = buf.getvalue()
    atomic_write(path, MAGIC + VERSION.to_bytes(4, "little") + hashlib.sha256(payload).digest()
                 + payload)


MAX_META_BYTES = 64 << 20   # the JSON meta, history included, is far smaller
MAX_FILE_BYTES = 1 << 36     # read() without the objects to size a checkpoint by
_NAMES = re.compile(r"(net/[0-9]+\.(weight|bias)|head/weight|adam/exp_avg|adam/exp_avg_sq|meta)")


def _read_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most max_bytes: a device (/dev/zero) or
    a FIFO is refused before reading, and nothing past max_bytes is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)   # opening a FIFO must not block
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path}: not a regular file (a device, FIFO or socket); a "
                                  "checkpoint is a regular file written by checkpoint.save")
        try:
            # never ask for more than the file holds: read() asks for a buffer
            # of that size up front, and max_bytes may be far beyond memory
            data = fh.read(min(max_bytes, info.st_size) + 1)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    if len(data) > max_bytes:
        raise CheckpointError(f"{path}: larger than the {max_bytes} bytes a checkpoint of this "
                              "network can take")
    return data


def _read_member(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str,
                 dtype: np.dtype, shape: tuple | None) -> np.ndarray:
    """One .npy member, its header checked against the expected dtype and shape
    (or, for the meta, a size bound) and against the member's size before its
    data is read."""
    fmt = np.lib.format
    try:
        with zf.open(info) as fh:
            version = fmt.read_magic(fh)
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else \
                fmt.read_array_header_2_0
            got_shape, fortran, got_dtype = read_header(fh)
            header_len = fh.tell()
            if got_dtype != dtype or fortran:
                raise CheckpointError(f"{path}: {key}: expected a {dtype} array in C order, got "
                                      f"dtype {got_dtype}{' (Fortran order)' if fortran else ''}")
            if shape is not None and tuple(got_shape) != tuple(shape):
                raise CheckpointError(f"{path}: {key}: expected shape {tuple(shape)}, the file "
                                      f"declares {tuple(got_shape)}")
            nbytes = math.prod(got_shape) * dtype.itemsize
            if key == "meta" and (len(got_shape) != 1 or nbytes > MAX_META_BYTES):
                raise CheckpointError(f"{path}: meta: expected at most {MAX_META_BYTES} bytes "
                                      f"of JSON, the file declares shape {tuple(got_shape)}")
            if info.file_size != header_len + nbytes:
                raise CheckpointError(f"{path}: {key}: the member holds {info.file_size} bytes, "
                                      f"its header declares {header_len + nbytes}")
            data = fh.read(nbytes)
    except CheckpointError:
        raise
    except Exception as exc:  # a bad npy header or CRC raises many kinds of errors
        raise CheckpointError(f"{path}: {key}: malformed ({exc})") from exc
    return np.frombuffer(data, dtype).reshape(got_shape)


def read(path, expected: dict | None = None, max_bytes: int = MAX_FILE_BYTES,
         architecture: dict | None = None) -> tuple[dict, dict]:
    """(arrays, meta) of a checkpoint file, verified. With `architecture`, the
    meta must record it. `expected` maps array names to shapes: then exactly those
    arrays must be there, with those shapes, as float32. The member list and every
    npy header are checked before any data is read, so a small file cannot make
    us allocate much."""
    path = Path(path)
    data = _read_file(path, max_bytes)
    if len(data) < HEADER or data[:len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{path}: not an adaloss checkpoint (bad magic or truncated header)")
    version = int.from_bytes(data[8:12], "little")
    if version != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version}; this adaloss reads "
                              f"version {VERSION}")
    payload = memoryview(data)[HEADER:]
    if hashlib.sha256(payload).digest() != data[12:44]:
        raise CheckpointError(f"{path}: checksum mismatch: the file is truncated or corrupted")
    try:
        zf = zipfile.ZipFile(io.BytesIO(payload))
        infos = zf.infolist()
    except Exception as exc:  # a valid checksum over a malformed payload
        raise CheckpointError(f"{path}: malformed payload ({exc})") from exc
    members = {}
    for info in infos:
        key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        if not _NAMES.fullmatch(key):
            raise CheckpointError(f"{path}: unexpected member {info.filename!r}; a checkpoint "
                                  "holds only net/<name>, head/weight, adam/exp_avg, "
                                  "adam/exp_avg_sq and meta")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{path}: member {info.filename!r} is compressed; checkpoints "
                                  "store their arrays uncompressed")
        if key in members:
            raise CheckpointError(f"{path}: member {info.filename!r} appears twice")
        members[key] = info
    if "meta" not in members:
        raise CheckpointError(f"{path}: meta: missing from the checkpoint")
    raw = _read_member(path, zf, members.pop("meta"), "meta", np.dtype(np.uint8), None)
    try:
        meta = json.loads(raw.tobytes().decode())
    except Exception as exc:  # bad UTF-8, bad JSON, nesting too deep
        raise CheckpointError(f"{path}: meta: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: meta: expected a JSON object, got {type(meta).__name__}")
    if architecture is not None:
        saved = _saved_architecture(_field(path, meta, "architecture"))
        if saved != architecture:
            raise CheckpointError(f"{path}: saved for another architecture: "
                                  f"{saved} vs {architecture}")
    if expected is not None:
        unexpected = sorted(set(members) - set(expected))
        missing = sorted(set(expected) - set(members))
        if unexpected:
            raise CheckpointError(f"{path}: {', '.join(unexpected)}: not in this network")
        if missing:
            raise CheckpointError(f"{path}: {', '.join(missing)}: missing from the checkpoint")
    arrays = {key: _read_member(path, zf, info, key, np.dtype("<f4"),
                                None if expected is None else expected[key])
              for key, info in members.items()}
    return arrays, meta


def _field(path: Path, table, key: str, where: str = "meta"):
    if not isinstance(table, dict):
        raise CheckpointError(f"{path}: {where}: expected a JSON object, got "
                              f"{type(table).__name__}")
    if key not in table:
        raise CheckpointError(f"{path}: {where}.{key}: missing from the checkpoint")
    return table[key]


def _validated(path: Path, arrays: dict, meta: dict, net: Sequential, head: _Head,
               optimizer: Adam) -> dict:
    """Everything load() copies, parsed and checked by the same validators the
    constructors and setters use; raises CheckpointError naming file and key.
    (read() has checked the architecture.)"""
    opt = _field(path, meta, "optimizer")
    num_params = _field(path, opt, "num_params", "optimizer")
    if num_params != len(optimizer.params):
        raise CheckpointError(f"{path}: the optimizer held {num_params} "
                              f"parameters, this one holds {len(optimizer.params)}")
    hyper = {k: _field(path, opt, k, "optimizer") for k in ("step", "lr", "betas", "eps",
                                                           "weight_decay")}
    running = _field(path, meta, "running")
    extra = _field(path, meta, "extra")
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path}: extra: expected a JSON object, got "
                              f"{type(extra).__name__}")
    key = "net"
    try:
        net_state = {}
        for name, arr in arrays.items():
            if name.startswith("net/"):
                key = name
                net_state[name[4:]] = _check_float32_array(name, arr)
        key = "head/weight"
        head_weight = _check_float32_array(key, arrays[key])
        key = "optimizer"   # the constructor's checks of the hyper-parameters
        Adam([], lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"],
             weight_decay=hyper["weight_decay"])
        key = "adam"
        adam = _check_adam_state({"step": hyper["step"], "lr": hyper["lr"],
                                  "exp_avg": arrays["adam/exp_avg"],
                                  "exp_avg_sq": arrays["adam/exp_avg_sq"]},
                                 sum(p.data.size for p in optimizer.params))
        stats = None
        if head.has_quality:
            key = "running"
            stats = _check_running_stats(_field(path, running, "mean", "running"),
                                         _field(path, running, "std", "running"))
    except CheckpointError:
        raise
    except (TypeError, ValueError) as exc:
        message = str(exc)
        where = "" if message.startswith(key.split("/")[-1]) or key in message else f"{key}: "
        raise CheckpointError(f"{path}: {where}{message}") from exc
    return {"net": net_state, "head": head_weight, "adam": adam, "running": stats,
            "extra": extra}


def _expected_arrays(net: Sequential, head: _Head, optimizer: Adam) -> dict:
    shapes = {f"net/{p.name}": p.data.shape for p in net.parameters()}
    shapes["head/weight"] = head.weight.shape
    size = sum(p.data.size for p in optimizer.params)
    shapes["adam/exp_avg"] = shapes["adam/exp_avg_sq"] = (size,)
    return shapes


def load(path, net: Sequential, head: _Head, optimizer: Adam,
         check_extra: Callable[[dict], object] | None = None) -> dict:
    """Restore a checkpoint into existing objects of the same architecture;
    returns the `extra` dict. Everything is read and checked before anything is
    copied: nothing is changed when anything fails, and every failure is a
    CheckpointError naming the file and the key. `check_extra(extra)`, if given,
    runs before the copy too; its TypeError, ValueError or KeyError becomes a
    CheckpointError (its own CheckpointError passes as it is)."""
    path = Path(path)
    expected = _expected_arrays(net, head, optimizer)
    max_bytes = (HEADER + MAX_META_BYTES + (1 << 20)
                 + sum(4 * math.prod(shape) + 256 for shape in expected.values()))
    arrays, meta = read(path, expected, max_bytes, _architecture(net, head))
    state = _validated(path, arrays, meta, net, head, optimizer)
    if check_extra is not None:
        try:
            check_extra(state["extra"])
        except CheckpointError:
            raise
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: extra: {exc!r}") from exc
    net.load_state_dict(state["net"])
    head.weight = state["head"]
    optimizer.load_state_dict(state["adam"])
    if state["running"] is not None:
        head.set_running_stats(*state["running"])
    return state["extra"]


LATEST = "latest.ckpt"   # the file fit(checkpoint_dir=...) writes after every epoch

_MOVED = {"save_training": "adaloss.training.save_training",
          "load_latest": "adaloss.training.load_latest"}


def __getattr__(name: str):
    # deprecated aliases of the resume helpers, which now live beside fit
    if name in _MOVED:
        warnings.warn(f"adaloss.checkpoint.{name} is deprecated; use {_MOVED[name]}",
                      DeprecationWarning, stacklevel=2)
        from . import training  # the one upward import: only for these deprecated names

        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
