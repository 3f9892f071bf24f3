"""Training and evaluation loops: Python chooses the batches, C does each step."""
from __future__ import annotations

import math
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import _core, checkpoint
from .nn import Sequential, Trainer, _check_int, _embed, _Head

__all__ = ["History", "fit", "evaluate", "predict", "embed", "margin_stats", "save_training",
           "load_latest", "margin_factor", "run_fingerprint", "THETA_EDGES_DEG"]

# the bins of the per-epoch target-angle histograms (degrees): 0..180 by 5
THETA_EDGES_DEG = tuple(float(v) for v in range(0, 181, 5))


@dataclass
class History:
    """Per-epoch records: (epoch, mean training loss, test accuracy, seconds)."""

    epochs: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)
    test_accuracy: list = field(default_factory=list)
    test_accuracy_plain: list = field(default_factory=list)
    seconds: list = field(default_factory=list)
    step_losses: list = field(default_factory=list)
    interrupted: bool = False
    skipped_steps: int = 0
    # margin schedules (fit's margin_warmup, softmax_warmup): per epoch, the
    # factor applied to the head's margins at the epoch's last step
    margin_factor: list = field(default_factory=list)
    # trap diagnostics (fit's diagnostics=): per epoch, the counts of theta_y
    # (degrees) of a fixed test subset in the bins THETA_EDGES_DEG
    theta_hist: list = field(default_factory=list)

    def rows(self) -> list:
        """Deprecated: zip the fields yourself."""
        warnings.warn("History.rows() is deprecated and will be removed; use "
                      "zip(h.epochs, h.train_loss, h.test_accuracy, h.seconds)",
                      DeprecationWarning, stacklevel=2)
        return list(zip(self.epochs, self.train_loss, self.test_accuracy, self.seconds))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _check_xy(x, y, name: str) -> tuple:
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise TypeError(f"{name}: expected NumPy arrays of images and labels")
    if len(x) != len(y):
        raise ValueError(f"{name}: {len(x)} images but {len(y)} labels")
    return x, y


def embed(net: Sequential, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Deprecated: use ``Trainer.embed(x)``. Embeddings of any number of
    examples, in batches."""
    warnings.warn("adaloss.training.embed(net, x) is deprecated; use trainer.embed(x)",
                  DeprecationWarning, stacklevel=2)
    return _embed(net, x, batch_size)


def predict(net: Sequential, head: _Head, x: np.ndarray, labels: np.ndarray | None = None,
            rule: str = "plain", batch_size: int = 1000) -> np.ndarray:
    """Predicted classes, in batches; rule='report' needs labels for ArcFace."""
    out = []
    for i in range(0, len(x), batch_size):
        lab = None if labels is None else labels[i:i + batch_size]
        out.append(head.predict(net.forward(x[i:i + batch_size]), lab, rule))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def evaluate(net: Sequential, head: _Head, x: np.ndarray, y: np.ndarray, rule: str = "plain",
             batch_size: int = 1000) -> float:
    """Accuracy in [0, 1]. rule='plain' is margin-free; 'report' is the report's
    own evaluation (its ArcFace applies the margin to the true class)."""
    return _accuracies(net, head, x, y, (rule,), batch_size)[rule]


def _accuracies(net: Sequential, head: _Head, x: np.ndarray, y: np.ndarray, rules,
                batch_size: int = 1000) -> dict:
    """{rule: accuracy} for several rules from one forward pass over x."""
    x, y = _check_xy(x, y, "x, y")
    if len(y) == 0:
        raise ValueError("x, y: expected at least one example")
    correct = dict.fromkeys(rules, 0)
    for i in range(0, len(x), batch_size):
        emb, lab = net.forward(x[i:i + batch_size]), y[i:i + batch_size]
        for rule in rules:
            pred = head.predict(emb, lab if rule == "report" else None, rule)
            correct[rule] += int(np.sum(pred == lab))
    return {rule: count / len(y) for rule, count in correct.items()}


def margin_stats(net: Sequential, head: _Head, x: np.ndarray, y: np.ndarray,
                 batch_size: int = 1000) -> dict:
    """Target angle theta_y (degrees) and, for AdaFace, quality q, per example,
    from the head's forward in eval mode (running statistics not updated)."""
    training = head.training
    head.eval()
    angles, quality = [], []
    softmax = not head.has_target_angle     # no angle in its logits: from the vectors
    if softmax:
        w = head.weight.astype(np.float64)
        w /= np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    try:
        for i in range(0, len(x), batch_size):
            emb, lab = net.forward(x[i:i + batch_size]), y[i:i + batch_size]
            head.forward(emb, lab)
            last = head.last_batch()
            if softmax:
                e = emb.astype(np.float64)
                e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
                cos = np.clip(np.einsum("nd,nd->n", e, w[lab]), -1.0, 1.0)
                angles.append(np.arccos(cos).astype(np.float32))
            else:
                angles.append(last["target_angle"])
            quality.append(last["quality"])
    finally:
        head.train(training)
    return {"theta_deg": np.degrees(np.concatenate(angles)),
            "quality": np.concatenate(quality) if head.has_quality else None}


def save_training(folder, trainer: Trainer, epoch: int, rng: np.random.Generator,
                  history: History, fingerprint: dict | None = None) -> None:
    """Save what fit needs to resume: the trainer's state, the epoch, the
    shuffling generator's state and the history, to ``folder/latest.ckpt``;
    `fingerprint`, the run's settings (fit's), to refuse resuming another run."""
    extra = {"fingerprint": fingerprint} if fingerprint is not None else {}
    checkpoint.save(Path(folder) / checkpoint.LATEST, trainer.net, trainer.head, trainer.optimizer,
                    epoch=epoch, rng=rng.bit_generator.state, history=history.to_dict(), **extra)


def run_fingerprint(trainer: Trainer, x_train: np.ndarray, y_train: np.ndarray,
                    batch_size: int, seed: int) -> dict:
    """The settings of a fit run that a resumed run must share: the training
    data's shape, type and a CRC-32 of its labels, the seed, batch size and
    learning rate (the layers and head settings are checked by the checkpoint
    itself). The epochs are not: a later fit with more epochs continues the run."""
    labels = np.ascontiguousarray(y_train)
    return {"train_shape": list(x_train.shape), "train_dtype": str(x_train.dtype),
            "labels_crc32": zlib.crc32(labels.tobytes()), "labels_dtype": str(labels.dtype),
            "seed": seed, "batch_size": batch_size, "lr": trainer.optimizer.lr}


def _check_resume(path: Path, extra: dict, fingerprint: dict | None,
                  epochs: int | None) -> None:
    """Refuse to resume a checkpoint of another run (when `fingerprint` is
    given), or one already beyond `epochs` (when given): load_latest's check,
    before anything is copied."""
    done = extra.get("epoch")
    if epochs is not None and isinstance(done, int) and done > epochs:
        raise checkpoint.CheckpointError(
            f"{path}: the checkpoint is at epoch {done}, beyond the {epochs} asked for; give "
            f"epochs >= {done}, another checkpoint_dir, or resume=False to start over")
    if fingerprint is None:
        return
    saved = extra.get("fingerprint")
    if saved is None:
        warnings.warn(f"{path}: a checkpoint without the run's settings (written before they "
                      "were recorded); resuming it without checking that it is of the same "
                      "data, seed, batch size and learning rate", stacklevel=6)
        return
    if not isinstance(saved, dict):
        raise TypeError(f"fingerprint: expected a JSON object, got {type(saved).__name__}")

    def show(value) -> str:
        return f"{value:.6g}" if isinstance(value, float) else repr(value)

    diffs = [f"{k} {show(saved.get(k))} there, {show(v)} now" for k, v in fingerprint.items()
             if saved.get(k) != v]
    if diffs:
        raise checkpoint.CheckpointError(
            f"{path}: the checkpoint is of another run ({'; '.join(diffs)}); give another "
            "checkpoint_dir, or resume=False to start over (the checkpoint is then replaced)")


def _check_training_extra(extra: dict) -> None:
    """What load_latest reads from `extra`, checked before the weights are copied."""
    _check_int("epoch", extra["epoch"], 0, 1 << 31)
    np.random.default_rng().bit_generator.state = extra["rng"]
    if not isinstance(extra["history"], dict):
        raise TypeError(f"history: expected a JSON object, got {type(extra['history']).__name__}")
    History.from_dict(extra["history"])


def load_latest(folder, trainer: Trainer, fingerprint: dict | None = None,
                epochs: int | None = None) -> dict | None:
    """Restore ``folder/latest.ckpt`` into the trainer; {"epoch", "rng",
    "history"} to resume from, or None when there is no checkpoint. Epoch, RNG
    state and history are checked before any weight is copied; so, when
    given, that the checkpoint is of the run `fingerprint` describes
    (run_fingerprint) and not beyond `epochs` (CheckpointError otherwise)."""
    path = Path(folder) / checkpoint.LATEST
    if not path.exists():
        return None

    def check(extra: dict) -> None:
        _check_resume(path, extra, fingerprint, epochs)
        _check_training_extra(extra)

    extra = checkpoint.load(path, trainer.net, trainer.head, trainer.optimizer, check_extra=check)
    rng = np.random.default_rng()
    rng.bit_generator.state = extra["rng"]
    return {"epoch": extra["epoch"], "rng": rng, "history": History.from_dict(extra["history"])}


def margin_factor(step: int, steps_per_epoch: int, margin_warmup: int = 0,
                  softmax_warmup: int = 0) -> float:
    """The factor on the head's margins at global step `step` (0-based, counted
    over all epochs): 0 for the first `softmax_warmup` epochs, then a linear
    ramp per step from 0 to 1 over `margin_warmup` epochs, then 1. A pure
    function of the step, so a resumed run continues the schedule exactly."""
    t = step - softmax_warmup * steps_per_epoch
    if t < 0:
        return 0.0
    if margin_warmup == 0:
        return 1.0
    return min(1.0, t / (margin_warmup * steps_per_epoch))


def _margins(head: _Head):
    """The head's margins, as _set_margin_factor scales them (None: no margin)."""
    if head.kind == "Softmax":
        return None
    if head.kind == "CombinedMargin":
        return (head.m1, head.m2, head.m3)
    return head.m


def _set_margin_factor(head: _Head, base, factor: float) -> None:
    """Scale the margins `base` by factor: m -> f m; the combined head's
    (m1, m2, m3) -> (1 + f (m1 - 1), f m2, f m3), so f = 0 is the identity
    target cos(theta) and f = 1 the configured margins."""
    if base is None:
        return
    if isinstance(base, tuple):
        m1, m2, m3 = base
        if factor == 1.0:
            head.set_margins(m1, m2, m3)
        else:
            head.set_margins(1.0 + factor * (m1 - 1.0), factor * m2, factor * m3)
    else:
        head.set_m(base if factor == 1.0 else factor * base)


def _theta_counts(trainer: Trainer, x: np.ndarray, y: np.ndarray) -> list:
    theta = margin_stats(trainer.net, trainer.head, x, y)["theta_deg"]
    return np.histogram(theta, bins=np.asarray(THETA_EDGES_DEG))[0].tolist()


def fit(trainer: Trainer, x_train: np.ndarray, y_train: np.ndarray, epochs: int = 1,
        batch_size: int = 64, x_test: np.ndarray | None = None, y_test: np.ndarray | None = None,
        seed: int = 0, eval_rule: str = "plain", progress: bool = True,
        skip_nonfinite: bool = False, checkpoint_dir=None, resume: bool = True,
        history: History | None = None, callback=None, margin_warmup: int = 0,
        softmax_warmup: int = 0, diagnostics: tuple | None = None) -> History:
    """Train for `epochs` with shuffled batches (seeded), evaluating after each epoch.

    Returns a History. Ctrl-C stops after the current step and returns the
    history so far (``history.interrupted``). A step with a non-finite loss or
    gradient is never applied; fit raises NonFiniteError naming the epoch and
    step, or skips the batch when ``skip_nonfinite``. With ``checkpoint_dir``
    the state is saved after every epoch and, when ``resume``, training resumes
    from the latest checkpoint there; the checkpoint records the run's settings
    (run_fingerprint: the training data's shape and labels, seed, batch size,
    learning rate) and a checkpoint of other settings, or one already past
    `epochs`, raises CheckpointError before anything is loaded (a checkpoint
    written before the settings were recorded resumes with a warning). A
    `checkpoint_dir` that is a file raises ValueError before training.

    Margin schedules: ``softmax_warmup`` epochs with the head's margins at 0
    (a normalised softmax with the head's scale s), then a linear warm-up of
    the margins from 0 to their values over ``margin_warmup`` epochs, per step
    (``margin_factor``). The schedule acts on the training steps only: after
    each epoch's steps the head holds its configured margins again (for the
    evaluation, the checkpoint and after fit). ``history.margin_factor``
    records the factor at each epoch's last step.

    ``diagnostics=(x, y)``: after every epoch, the histogram of the target
    angle theta_y of these examples, in the bins THETA_EDGES_DEG, goes to
    ``history.theta_hist``.
    """
    if not isinstance(trainer, Trainer):
        raise TypeError(f"trainer: expected an adaloss.Trainer, got {type(trainer).__name__}")
    x_train, y_train = _check_xy(x_train, y_train, "x_train, y_train")
    if len(y_train) == 0:
        raise ValueError("x_train: expected at least one example")
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs: expected a non-negative int, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if eval_rule not in ("plain", "report"):
        raise ValueError(f"eval_rule: expected 'plain' or 'report', got {eval_rule!r}")
    if (x_test is None) != (y_test is None):
        raise ValueError("x_test, y_test: give both or neither")
    for name, value in (("margin_warmup", margin_warmup), ("softmax_warmup", softmax_warmup)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected a non-negative int (epochs), got {value!r}")
    base = _margins(trainer.head)
    scheduled = base is not None and (margin_warmup > 0 or softmax_warmup > 0)
    if diagnostics is not None:
        if not isinstance(diagnostics, tuple) or len(diagnostics) != 2:
            raise TypeError("diagnostics: expected a tuple (images, labels)")
        _check_xy(*diagnostics, "diagnostics")
        if len(diagnostics[1]) == 0:
            raise ValueError("diagnostics: expected at least one example")
    fingerprint = None
    if checkpoint_dir is not None:
        folder = Path(checkpoint_dir)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"checkpoint_dir: {folder} is a file, expected a folder")
        if (folder / checkpoint.LATEST).is_dir():
            raise ValueError(f"checkpoint_dir: {folder / checkpoint.LATEST} is a folder, "
                             "expected a checkpoint file")
        fingerprint = run_fingerprint(trainer, x_train, y_train, batch_size, seed)
        folder.mkdir(parents=True, exist_ok=True)    # fails now, not after an epoch
    history = history or History()
    rng = np.random.default_rng(seed)
    start_epoch = 0
    if checkpoint_dir is not None and resume:
        state = load_latest(checkpoint_dir, trainer, fingerprint, epochs)
        if state is not None:
            start_epoch, rng, history = state["epoch"], state["rng"], state["history"]
    n = len(y_train)
    steps = math.ceil(n / batch_size)
    bar_cls = None
    if progress:
        from tqdm.auto import tqdm as bar_cls  # deferred on purpose: only for progress bars
    for epoch in range(start_epoch, epochs):
        order = rng.permutation(n)
        t0 = time.perf_counter()
        losses = []
        bar = bar_cls(total=steps, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                      unit="step") if bar_cls else None
        factor = 1.0
        try:
            for step in range(steps):
                idx = order[step * batch_size:(step + 1) * batch_size]
                if scheduled:
                    factor = margin_factor(epoch * steps + step, steps, margin_warmup,
                                           softmax_warmup)
                    _set_margin_factor(trainer.head, base, factor)
                try:
                    loss = trainer.step(x_train[idx], y_train[idx])
                except _core.NonFiniteError as exc:
                    if not skip_nonfinite:
                        raise _core.NonFiniteError(
                            f"epoch {epoch + 1}, step {step + 1}: {exc}; the step was not "
                            "applied (fit(..., skip_nonfinite=True) skips such batches)") from None
                    history.skipped_steps += 1
                    continue
                losses.append(loss)
                if bar is not None:
                    bar.update(1)
                    if step % 20 == 0:
                        bar.set_postfix(loss=f"{loss:.4f}")
        except KeyboardInterrupt:
            history.interrupted = True
        finally:
            if bar is not None:
                bar.close()
            if scheduled:
                _set_margin_factor(trainer.head, base, 1.0)
        seconds = time.perf_counter() - t0
        if history.interrupted:
            break
        history.epochs.append(epoch + 1)
        history.train_loss.append(float(np.mean(losses)) if losses else float("nan"))
        history.step_losses.append([float(v) for v in losses])
        history.seconds.append(seconds)
        if scheduled:
            history.margin_factor.append(factor)
        if diagnostics is not None:
            history.theta_hist.append(_theta_counts(trainer, *diagnostics))
        if x_test is not None:
            acc = _accuracies(trainer.net, trainer.head, x_test, y_test,
                              dict.fromkeys((eval_rule, "plain")))
            history.test_accuracy.append(acc[eval_rule])
            history.test_accuracy_plain.append(acc["plain"])
        if progress:
            acc = f", test accuracy {history.test_accuracy[-1]:.4f}" if x_test is not None else ""
            print(f"epoch {epoch + 1}/{epochs}: loss {history.train_loss[-1]:.4f}{acc}, "
                  f"{seconds:.1f} s ({n / seconds:.0f} images/s)", flush=True)
        if checkpoint_dir is not None:
            save_training(checkpoint_dir, trainer, epoch + 1, rng, history, fingerprint)
        if callback is not None:
            callback(epoch + 1, history)
    return history
