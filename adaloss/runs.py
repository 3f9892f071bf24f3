"""The unit of work: one training run (build, fit, evaluate, record).

``adaloss reproduce`` and ``adaloss study`` both train through ``run_one`` and
load their data through ``load_data``; a run's record is the JSON-ready dict
that results.json and the study's ``runs/*.json`` hold.
"""
from __future__ import annotations

import time

import numpy as np

from . import datasets, presets, training
from .presets import RunConfig

__all__ = ["run_one", "load_data", "DIAGNOSTIC_IMAGES"]

DIAGNOSTIC_IMAGES = 1000   # the first test images whose theta_y is histogrammed every epoch


def load_data(dataset: str, root=None) -> datasets.Dataset:
    """A preset's data set by name ("mnist" or "cifar10") from `root`."""
    if dataset == "mnist":
        return datasets.load_mnist(root)
    if dataset == "cifar10":
        return datasets.load_cifar10(root)
    raise ValueError(f"dataset: expected one of {presets.DATASETS}, got {dataset!r}")


def _histogram(values, bins) -> dict:
    counts, edges = np.histogram(values, bins=bins)
    return {"counts": counts.tolist(), "edges": edges.tolist()}


def run_one(config: RunConfig, seed: int, data: datasets.Dataset, progress: bool = True,
            batch_size: int | None = None) -> dict:
    """Train one (config, seed) and return its JSON record: the configuration,
    the per-epoch history, the final test accuracies, the wall time, the
    histograms of the target angle (and of AdaFace's quality) on the test set
    and the predictions on ten random test images. The history holds, per
    epoch, the theta_y histogram of the first DIAGNOSTIC_IMAGES test images
    (``history.theta_hist``, bins ``diagnostics.edges_deg``) and, with a
    warm-up, the margin factor."""
    trainer = presets.build(config, seed)
    n_diag = min(DIAGNOSTIC_IMAGES, len(data.test_labels))
    diagnostics = (data.test_images[:n_diag], data.test_labels[:n_diag])
    t0 = time.perf_counter()
    history = training.fit(trainer, data.train_images, data.train_labels, epochs=config.epochs,
                           batch_size=batch_size or config.batch_size, x_test=data.test_images,
                           y_test=data.test_labels, seed=seed, eval_rule=config.eval_rule,
                           progress=progress, margin_warmup=config.margin_warmup,
                           softmax_warmup=config.softmax_warmup, diagnostics=diagnostics)
    wall = time.perf_counter() - t0
    stats = training.margin_stats(trainer.net, trainer.head, data.test_images, data.test_labels)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(data.test_labels), size=10, replace=False))
    pred = training.predict(trainer.net, trainer.head, data.test_images[sample],
                            data.test_labels[sample], rule=config.eval_rule)
    return {
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
