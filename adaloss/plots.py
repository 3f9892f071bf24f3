"""The report's figures, and one it lacks (what the margin does to the angles).

Every function returns a matplotlib Figure (made without pyplot, so it works
headless and in notebooks); ``save(fig, path)`` writes PNG or SVG atomically.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from .fileio import atomic_write
from .metrics import TRAPPED_DEG
from .stats import ci_or_none

__all__ = ["loss_curve", "comparison", "sample_grid", "margin_distributions",
           "figures_from_results", "theta_epochs", "score_histograms", "roc_curves",
           "study_accuracy", "study_pairs", "study_curves", "save",
           "HEAD_LABELS"]

HEAD_LABELS = {"adaface": "AdaLoss (AdaFace)", "arcface": "ArcFace", "cosface": "CosFace",
               "softmax": "Softmax"}
COLORS = {"adaface": "tab:blue", "arcface": "tab:orange", "cosface": "tab:green",
          "softmax": "tab:gray"}


def _losses(history) -> list:
    if isinstance(history, dict):
        return list(history["train_loss"])
    if hasattr(history, "train_loss"):
        return list(history.train_loss)
    return [float(v) for v in history]


def loss_curve(history, title: str = "Training loss") -> Figure:
    """Training loss per epoch of one run (a History, its dict, or a list)."""
    losses = _losses(history)
    if not losses:
        raise ValueError("history: no epochs to plot")
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    epochs = np.arange(1, len(losses) + 1)
    ax.plot(epochs, losses, marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def comparison(curves: dict, title: str = "AdaLoss vs ArcFace") -> Figure:
    """Loss curves of several heads, each curve's minimum and maximum marked and
    labelled "(epoch, loss)" as in the report. `curves` maps a head name to a
    History, its dict, or a list of per-epoch losses."""
    if not curves:
        raise ValueError("curves: expected at least one curve")
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, history in curves.items():
        losses = np.asarray(_losses(history), float)
        epochs = np.arange(1, len(losses) + 1)
        color = COLORS.get(name)
        ax.plot(epochs, losses, marker=".", label=HEAD_LABELS.get(name, name), color=color)
        for which, idx, va in (("min", int(np.argmin(losses)), "top"),
                               ("max", int(np.argmax(losses)), "bottom")):
            ax.scatter([epochs[idx]], [losses[idx]], s=60, zorder=3, color=color,
                       marker="v" if which == "min" else "^", label="_nolegend_")
            ax.annotate(f"({epochs[idx]}, {losses[idx]:.4f})", (epochs[idx], losses[idx]),
                        textcoords="offset points", xytext=(6, -10 if va == "top" else 6),
                        fontsize=8, color=color)
    ax.margins(x=0.14, y=0.08)  # room for the (epoch, loss) labels
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def sample_grid(images: np.ndarray, true: np.ndarray, pred: np.ndarray, classes=None,
                rows: int = 2, cols: int = 5, title: str | None = None) -> Figure:
    """A grid of images (N, C, H, W) uint8 with true and predicted labels; grey
    for one channel. A wrong prediction is titled in red."""
    n = rows * cols
    if len(images) < n or len(true) < n or len(pred) < n:
        raise ValueError(f"images, true, pred: expected at least {n} of each")
    fig = Figure(figsize=(2 * cols, 2.3 * rows), layout="constrained")
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        img = np.asarray(images[i])
        if img.shape[0] == 1:
            ax.imshow(img[0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(img.transpose(1, 2, 0))
        name = (lambda k: classes[k] if classes is not None else str(k))
        ok = int(true[i]) == int(pred[i])
        ax.set_title(f"true: {name(int(true[i]))}\npred: {name(int(pred[i]))}", fontsize=9,
                     color="black" if ok else "red")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return fig


def _hist_from(record_hist):
    counts = np.asarray(record_hist["counts"], float)
    edges = np.asarray(record_hist["edges"], float)
    return counts, edges


def margin_distributions(records: list, title: str = "What the margin does") -> Figure:
    """Per head, the distribution of the target angle theta_y on the test set at
    the end of training, and, for AdaFace, of the quality indicator q. `records`
    are run records from results.json (with theta_hist / quality_hist) or dicts
    {"head": ..., "theta_deg": array, "quality": array or None}."""
    if not records:
        raise ValueError("records: expected at least one run")
    has_q = any(r.get("quality_hist") or r.get("quality") is not None for r in records)
    fig = Figure(figsize=(11 if has_q else 6, 4), layout="constrained")
    ax = fig.add_subplot(1, 2 if has_q else 1, 1)
    axq = fig.add_subplot(1, 2, 2) if has_q else None
    for r in records:
        head = r["head"]
        label = HEAD_LABELS.get(head, head)
        if "theta_hist" in r:
            counts, edges = _hist_from(r["theta_hist"])
        else:
            counts, edges = np.histogram(r["theta_deg"], bins=np.linspace(0, 180, 91))
        density = counts / max(counts.sum(), 1)
        ax.stairs(density, edges, label=label, color=COLORS.get(head), fill=False, linewidth=1.5)
        if axq is not None and (r.get("quality_hist") or r.get("quality") is not None):
            if r.get("quality_hist"):
                qc, qe = _hist_from(r["quality_hist"])
            else:
                qc, qe = np.histogram(r["quality"], bins=np.linspace(-1, 1, 41))
            axq.stairs(qc / max(qc.sum(), 1), qe, label=label, color=COLORS.get(head))
    ax.set_xlabel("target angle θ_y (degrees)")
    ax.set_ylabel("fraction of test images")
    ax.set_title("angle to the true class weight")
    ax.legend()
    ax.grid(alpha=0.3)
    if axq is not None:
        axq.set_xlabel("AdaFace quality indicator q")
        axq.set_ylabel("fraction of test images")
        axq.set_title("q (the adaptive part of the margin)")
        axq.legend()
        axq.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


def theta_epochs(records: list, title: str = "Target angle per epoch") -> Figure:
    """Heat maps of the per-epoch theta_y histograms (``history.theta_hist``)
    of runs, one panel per run: epoch across, angle up, colour the share of
    the diagnostic images in each 5-degree bin; the dashed line marks the
    trapped threshold (TRAPPED_DEG) and each panel's title the share beyond
    it at the last epoch."""
    records = [r for r in records if r.get("history", {}).get("theta_hist")]
    if not records:
        raise ValueError("records: no run has per-epoch theta_y histograms (history.theta_hist)")
    fig = Figure(figsize=(3.6 * len(records) + 1.2, 4.2), layout="constrained")
    axes = fig.subplots(1, len(records), sharey=True, squeeze=False)[0]
    panels = []
    for run in records:
        counts = np.asarray(run["history"]["theta_hist"], float)       # (epochs, bins)
        edges = np.asarray((run.get("diagnostics") or {}).get("edges_deg")
                           or np.linspace(0, 180, counts.shape[1] + 1), float)
        if counts.ndim != 2 or len(edges) != counts.shape[1] + 1:
            raise ValueError(f"{run.get('name', 'run')}: theta_hist of shape {counts.shape} "
                             f"does not fit {len(edges)} bin edges")
        panels.append((counts / np.maximum(counts.sum(axis=1, keepdims=True), 1), edges))
    vmax = max(0.05, max(float(share.max()) for share, _ in panels))
    mesh = None
    for ax, run, (share, edges) in zip(axes, records, panels):
        epochs = np.arange(0.5, len(share) + 1)
        mesh = ax.pcolormesh(epochs, edges, share.T, cmap="magma_r", vmin=0, vmax=vmax)
        ax.axhline(TRAPPED_DEG, color="tab:blue", ls="--", lw=1.4)
        ax.text(0.6, TRAPPED_DEG + 2, f"trapped > {TRAPPED_DEG:.0f}°", color="tab:blue",
                fontsize=8, va="bottom")
        trapped = share[-1][edges[:-1] >= TRAPPED_DEG].sum()
        name = run.get("name") or HEAD_LABELS.get(run["head"], run["head"])
        ax.set_title(f"{name}\n{100 * trapped:.0f} % trapped at epoch {len(share)}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 180)
        ax.set_yticks(range(0, 181, 30))
    axes[0].set_ylabel(r"$\theta_y$ (degrees)")
    fig.colorbar(mesh, ax=list(axes), label="share of images", shrink=0.9)
    fig.suptitle(title)
    return fig


def _curves_of(records: list) -> list:
    """(head, curves) of the records that hold metrics curves."""
    out = []
    for r in records:
        curves = (r.get("metrics") or {}).get("curves")
        if curves:
            out.append((r["head"], curves, r.get("metrics")))
    if not out:
        raise ValueError("records: no run holds verification curves (metrics.curves)")
    return out


def _set_label(metrics: dict) -> str:
    return "unseen-class test images" if metrics.get("protocol") == "open" else "test images"


def _rebin(edges: np.ndarray, counts: list, target: int = 60) -> tuple:
    """Fine histograms (same edges) cut to the range holding 99.8 % of their
    pairs and merged into about `target` bins: (edges, [counts, ...])."""
    total = np.sum(counts, axis=0)
    cum = np.cumsum(total) / max(total.sum(), 1)
    lo = int(np.searchsorted(cum, 0.001))
    hi = int(np.searchsorted(cum, 0.999)) + 1
    factor = max(1, int(np.ceil((hi - lo) / target)))
    lo = max(0, lo - factor)
    hi = min(len(total), hi + factor)
    hi = lo + int(np.ceil((hi - lo) / factor)) * factor
    out = []
    for c in counts:
        c = np.r_[np.asarray(c, float), np.zeros(max(0, hi - len(c)))]
        out.append(c[lo:hi].reshape(-1, factor).sum(axis=1))
    step = edges[1] - edges[0]
    return edges[0] + step * np.arange(lo, hi + 1, factor), out


def score_histograms(records: list, title: str = "Verification: cosine of genuine and "
                     "impostor pairs") -> Figure:
    """One panel per head: the distribution of the cosine similarity of genuine
    pairs (same class) and of impostor pairs (different classes), each
    normalised to its own total, from the run records' ``metrics.curves``. The
    less the two overlap, the better the embeddings verify."""
    items = _curves_of(records)
    cols = min(len(items), 4)
    rows = int(np.ceil(len(items) / cols))
    fig = Figure(figsize=(3.6 * cols + 0.4, 3.0 * rows + 0.8), layout="constrained")
    for i, (head, curves, m) in enumerate(items):
        ax = fig.add_subplot(rows, cols, i + 1)
        edges, (imp, gen) = _rebin(np.asarray(curves["cos_edges"], float),
                                   [curves["impostor_counts"], curves["genuine_counts"]])
        for counts, label, color in ((imp, "impostor", "tab:red"), (gen, "genuine", "tab:blue")):
            ax.stairs(counts / max(counts.sum(), 1), edges, fill=True, alpha=0.35, color=color,
                      label=label)
            ax.stairs(counts / max(counts.sum(), 1), edges, color=color, lw=1.2)
        auc = (m.get("verification") or {}).get("roc_auc")
        ax.set_title(f"{HEAD_LABELS.get(head, head)}" + (f" (AUROC {auc:.3f})" if auc else ""),
                     fontsize=10)
        ax.set_xlabel("cosine similarity (zoomed to 99.8 % of pairs)")
        if i % cols == 0:
            ax.set_ylabel("fraction of pairs")
        ax.set_xlim(edges[0], edges[-1])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{title} ({_set_label(items[0][2])})")
    return fig


def roc_curves(records: list, title: str = "Verification ROC") -> Figure:
    """Every head's ROC on one plot: true accept rate against false accept rate
    (log scale, down to 1 / the number of impostor pairs), with the AUROC in
    the legend."""
    items = _curves_of(records)
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.add_subplot()
    for head, curves, m in items:
        far = np.asarray(curves["roc"]["far"], float)
        tar = np.asarray(curves["roc"]["tar"], float)
        auc = (m.get("verification") or {}).get("roc_auc")
        label = HEAD_LABELS.get(head, head) + (f" (AUROC {auc:.3f})" if auc else "")
        ax.plot(far, tar, color=COLORS.get(head), lw=1.8, label=label)
    lo = min(min(c["roc"]["far"]) for _, c, _ in items)
    chance = np.logspace(np.log10(lo), 0, 50)
    ax.plot(chance, chance, ls="--", lw=1, color="0.6", label="chance (TAR = FAR)")
    ax.set_xscale("log")
    ax.set_xlim(right=1.0)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false accept rate (impostor pairs accepted)")
    ax.set_ylabel("true accept rate (genuine pairs accepted)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", fontsize=9)
    ax.set_title(f"{title} ({_set_label(items[0][2])})")
    return fig


def figures_from_results(results: dict, data=None) -> dict:
    """Every figure of a results.json (seed 0 of each head): per-run loss curves,
    the comparison, the margin distributions and, with the data set, the
    sample grid of the first run (AdaFace if present)."""
    dataset = results["dataset"]
    first = {}
    for run in results["runs"]:
        first.setdefault(run["head"], run)
    figs = {}
    for head, run in first.items():
        figs[f"loss_{head}"] = loss_curve(run["history"], f"{dataset} {results['preset']}: "
                                                          f"{HEAD_LABELS.get(head, head)} loss")
    figs["comparison"] = comparison({h: r["history"] for h, r in first.items()},
                                    f"{dataset} ({results['preset']} preset): training loss")
    figs["margins"] = margin_distributions(list(first.values()),
                                           f"{dataset} ({results['preset']} preset): angles at "
                                           "the end of training")
    if any(r.get("history", {}).get("theta_hist") for r in first.values()):
        figs["theta_epochs"] = theta_epochs(
            list(first.values()),
            f"{dataset} ({results['preset']} preset): $\\theta_y$ of the first test images, "
            "per epoch")
    with_curves = [r for r in first.values() if (r.get("metrics") or {}).get("curves")]
    if with_curves:
        tag = f"{dataset}, {results['preset']}"
        figs["scores"] = score_histograms(with_curves, f"{tag}: cosine of genuine and impostor "
                                                       "pairs")
        figs["roc"] = roc_curves(with_curves, f"{tag}: verification ROC")
    if data is not None:
        run = first.get("adaface") or next(iter(first.values()))
        idx = np.asarray(run["sample_indices"])
        test_x, test_y, names = data.test_images, data.test_labels, data.classes
        cifar = test_x.shape[1] == 3          # colour images: one wider row
        seen = (run.get("classes") or {}).get("seen")
        if seen is not None:          # open protocol: indices into the seen classes' test set
            keep = np.isin(test_y, seen)
            lut = {c: i for i, c in enumerate(seen)}
            test_x, test_y = test_x[keep], np.array([lut[c] for c in test_y[keep]], np.int64)
            names = [names[c] for c in seen]
        idx = idx[idx < len(test_y)]
        cols = 5
        rows = 1 if (cifar or len(idx) < 2 * cols) else 2
        if len(idx) >= cols:
            figs["samples"] = sample_grid(test_x[idx], test_y[idx],
                                          np.asarray(run["sample_predictions"]), names,
                                          rows=rows, cols=cols,
                                          title=f"{HEAD_LABELS.get(run['head'], run['head'])}: "
                                                "random test images")
    return figs


def _by_dataset(rows: list) -> dict:
    groups: dict = {}
    for row in rows:
        groups.setdefault(row["dataset"], []).append(row)
    if not groups:
        raise ValueError("summary: no finished runs to plot")
    return groups


def study_accuracy(summary: dict, title: str = "Test accuracy over seeds") -> Figure:
    """One panel per data set, one row per (preset, head) cell of a study
    summary: each seed's accuracy (dots), the mean with its 95 % CI (bar), the
    margin-free mean (open diamond, where it differs) and the report's number
    (red cross) beside the report cells."""
    groups = _by_dataset(summary["cells"])
    fig = Figure(figsize=(6.2 * len(groups), 0.42 * max(map(len, groups.values())) + 1.6),
                 layout="constrained")
    for i, (dataset, cells) in enumerate(sorted(groups.items(), reverse=True)):
        ax = fig.add_subplot(1, len(groups), i + 1)
        for y, c in enumerate(cells):
            color = COLORS.get(c["head"])
            ax.scatter(c["accuracies"], [y] * len(c["accuracies"]), s=14, color=color, alpha=0.6)
            ci = ci_or_none(c["ci95"])
            if ci:
                ax.plot(ci, [y, y], color=color, lw=2.5, alpha=0.8)
            ax.scatter([c["mean"]], [y], marker="|", s=250, color="k", zorder=3)
            if abs(c["margin_free_mean"] - c["mean"]) > 0.05:
                ax.scatter([c["margin_free_mean"]], [y], marker="D", s=30, facecolor="none",
                           edgecolor=color, zorder=3)
            if c.get("report"):
                ax.scatter([c["report"]], [y], marker="x", s=50, color="red", zorder=4)
        ax.set_yticks(range(len(cells)),
                      [f"{c['preset']}: {HEAD_LABELS.get(c['head'], c['head'])} ({c['n']})"
                       for c in cells])
        ax.invert_yaxis()
        ax.set_xlabel("test accuracy % (dots: seeds; bar: 95 % CI; |: mean)")
        ax.set_title(f"{dataset}")
        ax.grid(alpha=0.3, axis="x")
    handles = [Line2D([], [], ls="none", marker="D", markerfacecolor="none", color="k"),
               Line2D([], [], ls="none", marker="x", color="red")]
    fig.legend(handles, ["margin-free mean", "the report's number"], loc="outside lower center",
               ncols=2, fontsize=8)
    fig.suptitle(title)
    return fig


def study_pairs(summary: dict, title: str = "Paired differences (same seed, same start)") -> Figure:
    """One panel per data set, one row per pair of heads of a preset: the
    per-seed differences in points (dots), their mean and 95 % CI, the line at
    zero, and the Wilcoxon p-value."""
    rows = [p for p in summary["pairs"] if p.get("diffs")]
    groups = _by_dataset(rows)
    fig = Figure(figsize=(6.2 * len(groups), 0.5 * max(map(len, groups.values())) + 1.4),
                 layout="constrained")
    for i, (dataset, pairs) in enumerate(sorted(groups.items(), reverse=True)):
        ax = fig.add_subplot(1, len(groups), i + 1)
        for y, p in enumerate(pairs):
            ax.scatter(p["diffs"], [y] * len(p["diffs"]), s=14, color=COLORS.get(p["a"]),
                       alpha=0.6)
            ci = ci_or_none(p["ci95"])
            if ci:
                ax.plot(ci, [y, y], color=COLORS.get(p["a"]), lw=2.5, alpha=0.8)
            ax.scatter([p["mean_diff"]], [y], marker="|", s=250, color="k", zorder=3)
            ax.annotate(f"p = {p['wilcoxon_p']:.2f}", (1.0, y), xycoords=("axes fraction", "data"),
                        xytext=(4, -3), textcoords="offset points", fontsize=8)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(pairs)), [f"{p['preset']}: {HEAD_LABELS.get(p['a'], p['a'])} − "
                                          f"{HEAD_LABELS.get(p['b'], p['b'])} ({p['n']})"
                                          for p in pairs])
        ax.invert_yaxis()
        ax.set_xlabel("difference in test accuracy (points)")
        ax.set_title(dataset)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(title)
    return fig


def study_curves(records: list, title: str = "Per epoch, every run (test accuracy by each "
                 "preset's rule: the report's ArcFace with its margin)") -> Figure:
    """One row per (data set, preset) of a study's run records: the test accuracy
    (the preset's own rule) and the training loss (log scale) after each epoch,
    one line per run, coloured by head. Shows what a final number hides: a head
    whose accuracy peaks early and sinks, or whose loss stalls."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r["dataset"], r["preset"]), []).append(r)
    if not groups:
        raise ValueError("records: expected at least one run")
    fig = Figure(figsize=(11, 2.8 * len(groups) + 0.6), layout="constrained")
    order = sorted(groups, key=lambda k: (k[0] != "mnist", k))
    for row, key in enumerate(order):
        acc_ax = fig.add_subplot(len(groups), 2, 2 * row + 1)
        loss_ax = fig.add_subplot(len(groups), 2, 2 * row + 2)
        labelled = set()                                  # one legend entry per head
        for r in sorted(groups[key], key=lambda r: (r["head"], r["seed"])):
            hist, color = r["history"], COLORS.get(r["head"])
            epochs = np.asarray(hist["epochs"])
            label = None if r["head"] in labelled else HEAD_LABELS.get(r["head"], r["head"])
            labelled.add(r["head"])
            acc_ax.plot(epochs, 100 * np.asarray(hist["test_accuracy"], float), color=color,
                        alpha=0.8, lw=1.2, label=label)
            loss_ax.plot(epochs, hist["train_loss"], color=color, alpha=0.8, lw=1.2)
        acc_ax.set_ylabel("test accuracy %")
        acc_ax.set_title(f"{key[0]}, {key[1]}: test accuracy")
        acc_ax.legend(fontsize=8)
        loss_ax.set_yscale("log")
        loss_ax.set_ylabel("training loss")
        loss_ax.set_title(f"{key[0]}, {key[1]}: training loss")
        for ax in (acc_ax, loss_ax):
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


def save(fig: Figure, path) -> Path:
    """Write a figure as PNG or SVG (by suffix) through a temporary file."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in ("png", "svg"):
        raise ValueError(f"path: expected a .png or .svg file name, got {path.name!r}")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=110)
    atomic_write(path, buf.getvalue())
    return path
