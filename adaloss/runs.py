"""The unit of work: one training run (build, fit, evaluate, record).

``adaloss reproduce`` and ``adaloss study`` both train through ``run_one`` and
load their data through ``load_data``; a run's record is the JSON-ready dict
that results.json and the study's ``runs/*.json`` hold. ``evaluate_model``
measures a trained network's embeddings under a protocol (closed or open;
docs/evaluation.md), for ``run_one`` and for ``adaloss evaluate`` alike;
``save_model`` / ``load_model`` keep a run's final network and head.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from . import checkpoint, datasets, datasources, fileio, metrics, presets, training
from .presets import PROTOCOLS, RunConfig

__all__ = ["run_one", "load_data", "configs", "split_classes", "protocol_data",
           "evaluate_model", "save_model", "load_model", "GALLERY_SIZE", "DIAGNOSTIC_IMAGES"]

DIAGNOSTIC_IMAGES = 1000   # the first test images whose theta_y is histogrammed every epoch
GALLERY_SIZE = 2000        # seen-class training images in the open protocol's gallery
_FAR_GRID = np.logspace(-6, 0, 121)
_COS_EDGES = np.linspace(-1.0, 1.0, 401)    # 0.005 wide; empty bins at both ends are cut


def load_data(dataset, root=None, test_fraction: float | None = None,
              seed: int = 0) -> datasets.Dataset:
    """A data set by name ("mnist" or "cifar10", from `root`) or by path (an IDX
    folder, an image folder or an .npz: ``adaloss.datasources.load_any``)."""
    return datasources.load_any(dataset, root, test_fraction, seed)


def configs(data: datasets.Dataset, preset: str, epochs: int | None = None,
            protocol: str = "closed", extra_heads=()) -> list[RunConfig]:
    """The runs of `preset` on `data` (with `extra_heads`, some of
    presets.EXTRA_HEADS, for the fair preset). The official data sets take
    the preset's runs as they are; other data take the networks of the
    preset's MNIST runs (grey images) or CIFAR-10 runs (colour), adapted to
    the images' shape and number of classes (``presets.adapt``), without the
    report's numbers."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")
    if data.name in presets.DATASETS:
        out = presets.runs(data.name, preset, epochs, extra_heads)
    else:
        base = "cifar10" if data.train_images.shape[1] == 3 else "mnist"
        out = []
        for config in presets.runs(base, preset, epochs, extra_heads):
            config = presets.adapt(config, data.train_images.shape[1:],
                                   len(data.classes), data.name)
            config.report_accuracy = None
            config.notes.append(f"the {base} network of the {preset} preset, adapted to "
                                f"{data.name}")
            out.append(config)
    for config in out:
        config.protocol = protocol
    return out


def split_classes(num_classes: int, seed: int) -> tuple[list, list]:
    """The open protocol's (seen, unseen) classes, sorted: a seeded half of
    ``range(num_classes)`` (the larger half seen when odd), from a generator of
    its own so that nothing else drawn from `seed` changes."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 4:
        raise ValueError(f"num_classes: the open protocol needs at least 4 classes (2 seen, "
                         f"2 unseen), got {num_classes!r}")
    rng = np.random.default_rng([int(seed), 0x09E2])
    seen = np.sort(rng.choice(int(num_classes), size=math.ceil(num_classes / 2), replace=False))
    unseen = np.setdiff1d(np.arange(num_classes), seen)
    return seen.tolist(), unseen.tolist()


def _remap(labels: np.ndarray, seen: list) -> np.ndarray:
    lut = np.full(max(int(labels.max()), max(seen)) + 1, -1, np.int64)
    lut[np.asarray(seen)] = np.arange(len(seen))
    return lut[labels]


def protocol_data(data: datasets.Dataset, seen: list) -> datasets.Dataset:
    """The seen classes of `data` (train and test), labels remapped to 0..k-1
    in the order of `seen`: what the open protocol trains and tests on."""
    tr = np.isin(data.train_labels, seen)
    te = np.isin(data.test_labels, seen)
    return datasets.Dataset(np.ascontiguousarray(data.train_images[tr]),
                            _remap(data.train_labels[tr], seen),
                            np.ascontiguousarray(data.test_images[te]),
                            _remap(data.test_labels[te], seen),
                            classes=[data.classes[c] if c < len(data.classes) else str(c)
                                     for c in seen], name=data.name)


def _curves(ver: dict) -> dict:
    """The figures' data from a verification's ROC: genuine and impostor
    cosine histograms (exact counts, from the cumulative counts the ROC holds)
    and the ROC sampled at log-spaced FARs."""
    roc = ver["roc"]
    fpr, tpr, thr = roc["fpr"], roc["tpr"], roc["thresholds"]
    n_gen, n_imp = ver["num_genuine"], ver["num_impostor"]
    asc = thr[::-1]
    at = len(thr) - np.searchsorted(asc, _COS_EDGES, side="left") - 1   # last point >= edge
    ge_gen = np.rint(tpr[at] * n_gen)
    ge_imp = np.rint(fpr[at] * n_imp)
    ge_gen[0], ge_imp[0] = n_gen, n_imp                  # every score counts from -1 up
    ge_gen = np.r_[ge_gen[:-1], 0]                       # the top bin includes 1.0
    ge_imp = np.r_[ge_imp[:-1], 0]
    gen, imp = ge_gen[:-1] - ge_gen[1:], ge_imp[:-1] - ge_imp[1:]
    used = np.nonzero(gen + imp)[0]
    lo, hi = int(used.min()), int(used.max()) + 1          # keep records small
    far = _FAR_GRID[_FAR_GRID * n_imp >= 1.0]
    tar = tpr[np.searchsorted(fpr, far, side="right") - 1]
    return {"cos_edges": _COS_EDGES[lo:hi + 1].tolist(),
            "genuine_counts": gen[lo:hi].astype(int).tolist(),
            "impostor_counts": imp[lo:hi].astype(int).tolist(),
            "roc": {"far": far.tolist(), "tar": tar.tolist()}}


def _embedding_metrics(emb: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    ver = metrics.verification(emb, labels, seed=seed)
    curves = _curves(ver)
    ver.pop("roc")
    return {"retrieval": metrics.retrieval(emb, labels), "verification": ver,
            "curves": curves}


def _summary(m: dict) -> dict:
    """The headline numbers of an ``evaluate_model`` result (for per-epoch records)."""
    if m.get("error"):
        return {"error": m["error"]}
    osr = m.get("open_set") or {}
    return {"precision_at_1": m["retrieval"]["precision_at_1"],
            "map_at_r": m["retrieval"]["map_at_r"],
            "roc_auc": m["verification"]["roc_auc"], "eer": m["verification"]["eer"],
            "open_set_auroc_weights": (osr.get("class_weights") or {}).get("auroc"),
            "open_set_auroc_gallery": (osr.get("gallery") or {}).get("auroc")}


def evaluate_model(net, head, data: datasets.Dataset, protocol: str = "closed", seed: int = 0,
                   seen: list | None = None) -> dict:
    """Metrics of a trained network (and head) on `data` under `protocol`, as
    plain JSON numbers (``adaloss.metrics`` defines them; docs/evaluation.md).

    - closed: retrieval (leave-one-out) and verification on all test images;
      ``accuracy``, the head's margin-free accuracy, when the head has one
      class per class of `data`.
    - open: `seen` (default: ``split_classes(C, seed)``) are the classes the
      network was trained on. Retrieval and verification on the test images
      of the other classes; open-set AUROC of seen (known) against unseen
      test images, by the maximum cosine to the class weights (when the head
      has one row per seen class) and to a gallery of at most GALLERY_SIZE
      seen-class training images (drawn with `seed`); ``seen_accuracy``, the
      head's margin-free accuracy on the seen test images.

    Verification pairs and folds are drawn with `seed`. A metric that cannot
    be computed (e.g. a zero embedding, whose cosine is undefined) leaves
    ``error`` instead of the numbers.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")
    n_classes = len(data.classes) or int(data.train_labels.max()) + 1
    out = {"protocol": protocol, "seed": int(seed), "num_test": int(len(data.test_labels))}
    try:
        if protocol == "closed":
            emb = training._embed(net, data.test_images, 1000)
            out.update(_embedding_metrics(emb, data.test_labels, seed))
            out["open_set"] = None
            out["accuracy"] = (training.evaluate(net, head, data.test_images, data.test_labels)
                               if head.num_classes == n_classes else None)
            return metrics.jsonable(out)
        if seen is None:
            seen, unseen = split_classes(n_classes, seed)
        else:
            seen = sorted(int(c) for c in seen)
            unseen = [c for c in range(n_classes) if c not in seen]
        out["classes"] = {"seen": list(seen), "unseen": unseen}
        known = protocol_data(data, seen)
        unknown = np.isin(data.test_labels, unseen)
        if not unknown.any() or not len(known.test_labels):
            raise ValueError("the test set holds no image of the seen or of the unseen classes")
        u_emb = training._embed(net, np.ascontiguousarray(data.test_images[unknown]), 1000)
        out.update(_embedding_metrics(u_emb, data.test_labels[unknown], seed))
        out["num_unseen_test"] = int(unknown.sum())
        k_emb = training._embed(net, known.test_images, 1000)
        rng = np.random.default_rng([int(seed), 0x6A11])
        pick = np.sort(rng.permutation(len(known.train_labels))[:GALLERY_SIZE])
        g_emb = training._embed(net, np.ascontiguousarray(known.train_images[pick]), 1000)
        own_head = head.num_classes == len(seen)
        weights = head.weight if own_head else None
        if not own_head and head.num_classes == n_classes:
            weights = head.weight[np.asarray(seen)]        # the seen classes' rows
            out["note"] = ("the network was trained on every class: the 'unseen' classes "
                           "were seen in training, so these are not open-set numbers")
        out["open_set"] = metrics.open_set(k_emb, known.test_labels, u_emb, weights, g_emb,
                                           known.train_labels[pick])
        out["open_set"]["gallery_size"] = int(len(pick))
        out["seen_accuracy"] = (training.evaluate(net, head, known.test_images,
                                                  known.test_labels) if own_head else None)
    except ValueError as exc:
        out["error"] = str(exc)
    return metrics.jsonable(out)


def save_model(path, trainer, config: RunConfig, seed: int, **extra) -> None:
    """A run's final network, head and optimizer in the checkpoint format
    (``adaloss.checkpoint``), with its configuration and seed: what
    ``load_model`` and ``adaloss evaluate`` rebuild it from."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(path, trainer.net, trainer.head, trainer.optimizer,
                    config=config.to_dict(), seed=int(seed), **extra)


def load_model(path) -> tuple:
    """(config, trainer, extra) of a checkpoint written by ``save_model``: the
    network and head rebuilt from the configuration it holds, then loaded."""
    _, meta = checkpoint.read(path)
    extra = meta.get("extra") or {}
    if "config" not in extra:
        raise checkpoint.CheckpointError(f"{path}: holds no run configuration (not written by "
                                         "adaloss reproduce); cannot rebuild its network")
    config = RunConfig.from_dict(extra["config"])
    trainer = presets.build(config, int(extra.get("seed", 0)))
    checkpoint.load(path, trainer.net, trainer.head, trainer.optimizer)
    return config, trainer, extra


def _histogram(values, bins) -> dict:
    counts, edges = np.histogram(values, bins=bins)
    return {"counts": counts.tolist(), "edges": edges.tolist()}


# Beside a run's per-epoch checkpoint: {"epoch", "wall_seconds"}, the run's
# wall time (training, evaluation, diagnostics, saving) up to that epoch.
ELAPSED = "elapsed.json"


def _read_elapsed(folder) -> dict:
    """ELAPSED of a checkpoint folder; {} when there is none or it is not valid."""
    if folder is None:
        return {}
    try:
        value = json.loads((Path(folder) / ELAPSED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    ok = isinstance(value, dict) and isinstance(value.get("epoch"), int) \
        and isinstance(value.get("wall_seconds"), (int, float)) \
        and math.isfinite(value["wall_seconds"]) and value["wall_seconds"] >= 0
    return value if ok else {}


def run_one(config: RunConfig, seed: int, data: datasets.Dataset, progress: bool = True,
            batch_size: int | None = None, evaluate: bool = True, model_path=None,
            metrics_every_epoch: bool = False, checkpoint_dir=None) -> dict:
    """Train one (config, seed) and return its JSON record: the configuration,
    the per-epoch history, the final test accuracies, the wall time, the
    histograms of the target angle (and of AdaFace's quality) on the test set
    and the predictions on ten random test images; with `evaluate`, the
    embedding metrics of ``evaluate_model`` under the config's protocol
    (``"metrics"``). `model_path` saves the final network and head there.
    `metrics_every_epoch` also measures after every epoch (about 20 s each on
    the full MNIST test set; not counted in ``wall_seconds``) and records the
    headline numbers as ``"metrics_per_epoch"`` (``_summary``). The history
    holds, per epoch, the theta_y histogram of the first DIAGNOSTIC_IMAGES test
    images (``history.theta_hist``, bins ``diagnostics.edges_deg``) and, with a
    warm-up, the margin factor.

    Under the open protocol the run trains and tests (accuracy, angles,
    samples) on the seen classes only (``split_classes(C, seed)``, recorded
    as ``"classes"``), with a head of that many classes.

    `checkpoint_dir`: fit saves the run there after every epoch and resumes
    from it (``fit(checkpoint_dir=...)``: the same weights, history and
    record as an uninterrupted run); a resumed run's record says after which
    epoch (``"resumed_after_epoch"``) and its ``wall_seconds`` adds the time
    the earlier process had spent up to that epoch (``ELAPSED`` beside the
    checkpoint; without it, the earlier epochs' training steps alone). Not
    with `metrics_every_epoch`, whose per-epoch measurements of the earlier
    epochs would be lost."""
    if checkpoint_dir is not None and metrics_every_epoch:
        raise ValueError("checkpoint_dir: cannot be combined with metrics_every_epoch (the "
                         "measurements of the epochs before a resume would be lost)")
    full, seen = data, None
    if config.protocol == "open":
        seen, unseen = split_classes(len(data.classes), seed)
        data = protocol_data(data, seen)
        config = RunConfig.from_dict(config.to_dict())
        config.num_classes = len(seen)
    trainer = presets.build(config, seed)
    n_diag = min(DIAGNOSTIC_IMAGES, len(data.test_labels))
    diagnostics = (data.test_images[:n_diag], data.test_labels[:n_diag])
    t0 = time.perf_counter()
    per_epoch, eval_seconds = [], [0.0]
    before = _read_elapsed(checkpoint_dir)
    # epochs trained before this call (from a checkpoint) and their wall time
    resumed: dict = {}

    def note_resumed(epochs: int, history) -> None:
        seconds = before["wall_seconds"] if before.get("epoch") == epochs \
            else float(sum(history.seconds[:epochs]))
        resumed.update(epochs=epochs, seconds=seconds)

    def after_epoch(epoch: int, history) -> None:
        if not resumed:                   # the first epoch this call trained (1-based)
            note_resumed(epoch - 1, history)
        if checkpoint_dir is not None:
            wall = resumed["seconds"] + time.perf_counter() - t0 - eval_seconds[0]
            fileio.atomic_write(Path(checkpoint_dir) / ELAPSED, json.dumps(
                {"epoch": epoch, "wall_seconds": wall}).encode())
        if not metrics_every_epoch:
            return
        t = time.perf_counter()
        per_epoch.append(dict(epoch=epoch, **_summary(
            evaluate_model(trainer.net, trainer.head, full, config.protocol, seed, seen))))
        eval_seconds[0] += time.perf_counter() - t

    history = training.fit(trainer, data.train_images, data.train_labels, epochs=config.epochs,
                           batch_size=batch_size or config.batch_size, x_test=data.test_images,
                           y_test=data.test_labels, seed=seed, eval_rule=config.eval_rule,
                           progress=progress, margin_warmup=config.margin_warmup,
                           softmax_warmup=config.softmax_warmup, diagnostics=diagnostics,
                           callback=after_epoch, checkpoint_dir=checkpoint_dir)
    if not resumed:                       # the checkpoint was final: nothing left to train
        note_resumed(len(history.epochs), history)
    wall = time.perf_counter() - t0 - eval_seconds[0] + resumed["seconds"]
    stats = training.margin_stats(trainer.net, trainer.head, data.test_images, data.test_labels)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(data.test_labels), size=min(10, len(data.test_labels)),
                                replace=False))
    pred = training.predict(trainer.net, trainer.head, data.test_images[sample],
                            data.test_labels[sample], rule=config.eval_rule)
    record = {
        "name": config.name, "head": config.head, "seed": seed, "config": config.to_dict(),
        # per-epoch records only: the per-step losses would make each file ~100x larger
        "history": {k: v for k, v in history.to_dict().items() if k != "step_losses"},
        "test_accuracy": history.test_accuracy[-1] if history.test_accuracy else None,
        "test_accuracy_plain": (history.test_accuracy_plain[-1]
                                if history.test_accuracy_plain else None),
        "wall_seconds": wall,
        "theta_hist": _histogram(stats["theta_deg"], np.linspace(0, 180, 91)),
        "theta_mean_deg": float(np.mean(stats["theta_deg"])),
        "quality_hist": (_histogram(stats["quality"], np.linspace(-1, 1, 41))
                         if stats["quality"] is not None else None),
        "sample_indices": sample.tolist(), "sample_predictions": pred.tolist(),
        "diagnostics": {"images": n_diag, "edges_deg": list(training.THETA_EDGES_DEG)},
    }
    record["protocol"] = config.protocol
    if resumed["epochs"]:
        record["resumed_after_epoch"] = resumed["epochs"]
    if seen is not None:
        record["classes"] = {"seen": seen, "unseen": unseen}
    if metrics_every_epoch:
        record["metrics_per_epoch"] = per_epoch
    if evaluate:
        t1 = time.perf_counter()
        record["metrics"] = evaluate_model(trainer.net, trainer.head, full, config.protocol,
                                           seed, seen)
        record["metrics_seconds"] = time.perf_counter() - t1
    if model_path is not None:
        save_model(model_path, trainer, config, seed, protocol=config.protocol,
                   classes=record.get("classes"))
    return record
