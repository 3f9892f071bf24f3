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
over the target, so a crash mid-save never destroys the previous checkpoint.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .nn import Adam, Sequential, Trainer, _Head

MAGIC = b"ADALOSS\0"
VERSION = 1
HEADER = len(MAGIC) + 4 + 32

__all__ = ["save", "load", "CheckpointError", "save_training", "load_latest"]


class CheckpointError(ValueError):
    """A checkpoint is truncated, corrupted, of another version or architecture."""


def _architecture(net: Sequential, head: _Head) -> dict:
    settings = {"kind": head._kind, "variant": head.variant,
                "num_classes": head.num_classes, "embedding_dim": head.embedding_dim,
                "s": head.s, "m": head.m, "h": head.h, "t_alpha": head.t_alpha}
    if head._kind == "ArcFace":
        settings["rule"] = head.rule
    elif head._kind == "CombinedMargin":
        settings.update(m1=head.m1, m2=head.m2, m3=head.m3)
    return {"layers": [list(layer.spec()) for layer in net.layers],
            "input_shape": list(net.input_shape), "head": settings}


def _saved_architecture(meta: dict) -> dict:
    """The saved architecture; an ArcFace saved before margin rules existed
    used the fallback rule."""
    arch = meta["architecture"]
    if arch.get("head", {}).get("kind") == "ArcFace" and "rule" not in arch["head"]:
        arch = {**arch, "head": {**arch["head"], "rule": "fallback"}}
    return arch


def atomic_write(path, data: bytes) -> None:
    """Write bytes to path through a fsynced temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the usual mode
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(path, net: Sequential, head: _Head, optimizer: Adam, **extra) -> None:
    """Save weights, Adam moments and step, AdaFace running statistics and any
    JSON-serialisable `extra` (epoch, RNG state, history ...)."""
    if not isinstance(net, Sequential) or not isinstance(head, _Head) or not isinstance(optimizer, Adam):
        raise TypeError("save(path, net, head, optimizer): expected an adaloss Sequential, head "
                        "and Adam")
    arrays = {f"net/{k}": v for k, v in net.state_dict().items()}
    arrays["head/weight"] = head.weight.copy()
    adam = optimizer.state_dict()
    arrays["adam/exp_avg"], arrays["adam/exp_avg_sq"] = adam["exp_avg"], adam["exp_avg_sq"]
    meta = {"architecture": _architecture(net, head),
            "optimizer": {"step": adam["step"], "lr": adam["lr"], "betas": list(optimizer.betas),
                          "eps": optimizer.eps, "weight_decay": optimizer.weight_decay,
                          "num_params": len(optimizer.params)},
            "running": ({"mean": head.running_mean, "std": head.running_std}
                        if head._kind == "AdaFace" else None),
            "extra": extra}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    payload = buf.getvalue()
    atomic_write(path, MAGIC + VERSION.to_bytes(4, "little") + hashlib.sha256(payload).digest()
                 + payload)


def read(path) -> tuple[dict, dict]:
    """(arrays, meta) of a checkpoint file, verified."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    if len(data) < HEADER or data[:len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{path}: not an adaloss checkpoint (bad magic or truncated header)")
    version = int.from_bytes(data[8:12], "little")
    if version != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version}; this adaloss reads "
                              f"version {VERSION}")
    payload = data[HEADER:]
    if hashlib.sha256(payload).digest() != data[12:44]:
        raise CheckpointError(f"{path}: checksum mismatch: the file is truncated or corrupted")
    try:
        with np.load(io.BytesIO(payload)) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except Exception as exc:  # a valid checksum over a malformed payload
        raise CheckpointError(f"{path}: malformed payload ({exc})") from exc
    return arrays, meta


def load(path, net: Sequential, head: _Head, optimizer: Adam) -> dict:
    """Restore a checkpoint into existing objects of the same architecture;
    returns the `extra` dict. Nothing is changed when anything fails."""
    arrays, meta = read(path)
    saved = _saved_architecture(meta)
    if saved != _architecture(net, head):
        raise CheckpointError(f"{path}: saved for another architecture: "
                              f"{saved} vs {_architecture(net, head)}")
    if meta["optimizer"]["num_params"] != len(optimizer.params):
        raise CheckpointError(f"{path}: the optimizer held {meta['optimizer']['num_params']} "
                              f"parameters, this one holds {len(optimizer.params)}")
    state = {k[4:]: v for k, v in arrays.items() if k.startswith("net/")}
    adam = optimizer.state_dict()
    for key in ("exp_avg", "exp_avg_sq"):
        if arrays[f"adam/{key}"].shape != adam[key].shape:
            raise CheckpointError(f"{path}: Adam moments of another size")
    net.load_state_dict(state)  # validates keys and shapes before copying
    head.weight = arrays["head/weight"]
    optimizer.load_state_dict({"exp_avg": arrays["adam/exp_avg"],
                               "exp_avg_sq": arrays["adam/exp_avg_sq"],
                               "step": meta["optimizer"]["step"], "lr": meta["optimizer"]["lr"]})
    if meta["running"] is not None:
        head.set_running_stats(meta["running"]["mean"], meta["running"]["std"])
    return meta["extra"]


# ---- used by fit(checkpoint_dir=...)

LATEST = "latest.ckpt"


def save_training(folder, trainer: Trainer, epoch: int, rng: np.random.Generator, history) -> None:
    save(Path(folder) / LATEST, trainer.net, trainer.head, trainer.optimizer, epoch=epoch,
         rng=rng.bit_generator.state, history=history.to_dict())


def load_latest(folder, trainer: Trainer):
    path = Path(folder) / LATEST
    if not path.exists():
        return None
    extra = load(path, trainer.net, trainer.head, trainer.optimizer)
    from .training import History

    rng = np.random.default_rng()
    rng.bit_generator.state = extra["rng"]
    return {"epoch": extra["epoch"], "rng": rng, "history": History.from_dict(extra["history"])}
