#!/usr/bin/env python3
"""Keep the study's numbers in docs/findings.md (and README.md) equal to the study.

The prose of docs/findings.md is written by hand; this script owns two things
in it (and in README.md and any other docs/*.md), both read from
benchmarks/study/summary.json and the run records in benchmarks/study/runs/
and benchmarks/study/extra/:

1. Tables, between marker comments. The script replaces what lies between

       <!-- table:NAME -->
       ...
       <!-- /table -->

   with the table NAME: ``cells-mnist`` / ``cells-cifar10`` (every cell of a
   data set), ``pairs-mnist`` / ``pairs-cifar10`` (the paired differences
   between heads) and ``headline`` (the report's four experiments, for the
   README).

2. Annotated numbers. A number followed by an annotation comment (no space
   needed, so that "66.33<!-- ... --> %" renders as "66.33 %") is checked
   against the study at the precision it is written with (``+2.44`` must be
   the value rounded to two decimals; ``−`` and ``-`` are both minus signs):

       +2.44 <!-- pair: cifar10 fair adaface softmax mean_diff -->
       66.33 <!-- cell: cifar10 fair adaface mean -->
       36.2 <!-- study: cpu_hours -->
       68.54 <!-- run: cifar10-fair-arcface-seed0 peak_accuracy -->
       66.72 <!-- run: extra/cifar10-fair-arcface-lr1e-4 test_accuracy -->
       14.6 <!-- diff: cell cifar10 report arcface margin_free_mean | cell cifar10 report arcface mean -->

   ``cell: DATASET PRESET HEAD FIELD``: FIELD of that cell of
   ``summary.json["cells"]``; a dotted path indexes lists (``ci95.0`` is the
   lower bound, ``accuracies.2`` seed index 2).
   ``pair: DATASET PRESET A B FIELD``: the pair of heads A and B of
   ``summary.json["pairs"]`` oriented as A − B: when the summary stores B − A,
   ``mean_diff`` and ``diffs`` change sign and ``ci95`` becomes
   ``[-high, -low]``.
   ``study: FIELD``: a top-level field of summary.json (``runs``,
   ``cpu_hours``).
   ``run: NAME FIELD``: one run record, ``runs/NAME.json``, or the single run of
   ``extra/FOLDER/results.json`` for ``extra/FOLDER``. FIELD is a key of the
   record (``theta_mean_deg``, ``wall_seconds``) or one of the derived values
   in RUN_FIELDS (accuracies in %; ``theta_share_LO_HI`` is the % of the test
   set whose angle to its own class weight lies in [LO°, HI°), HI defaulting
   to 180; both on the record's 2° histogram bin edges; ``trapped_epoch_N``
   is the % of the first 1,000 test images at θ_y ≥ 140° after epoch N, from
   the per-epoch histograms of runs since the remedies).
   ``diff: KIND ARGS | KIND ARGS``: the first value minus the second, each
   written as above without the colon.

3. The open-protocol study, benchmarks/study-open/ (unseen classes): the
   tables ``open-cells`` (each cell's seen-class accuracy and embedding
   metrics) and ``open-pairs`` (paired differences between heads of MAP@R,
   TAR@FAR=1e-3, open-set AUROC and the trapped share), and annotations
   whose kind carries ``@study-open``, e.g.
   ``+1.23 <!-- mpair@study-open: mnist fair arcface-open softmax-open map_at_r mean_diff -->``.
   ``mpair: DATASET PRESET A B METRIC FIELD`` is the paired difference of an
   embedding metric (``summary.json["metric_pairs"]``, oriented as A − B);
   the metrics of a cell are ``cell`` fields such as
   ``metrics.map_at_r.mean``.

    python benchmarks/findings_tables.py            # check: exit 1 and list what differs
    python benchmarks/findings_tables.py --write    # rewrite the tables in place

Run ``--write`` after ``adaloss study ... --max-runs 0`` refreshed the summary;
then read ``--check``'s list of annotated numbers that no longer hold and
rewrite those sentences by hand.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "benchmarks" / "study"
STUDY_OPEN = ROOT / "benchmarks" / "study-open"


def doc_files() -> list:
    """The files checked: README.md and every docs/*.md (tables may sit in any)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


PRESETS = ("report", "paper", "fair")
HEADS = ("adaface", "arcface", "cosface", "softmax")
HEAD_NAME = {"adaface": "AdaFace", "arcface": "ArcFace", "cosface": "CosFace",
             "softmax": "softmax"}
DATA_NAME = {"mnist": "MNIST", "cifar10": "CIFAR-10"}

TABLE_RE = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)
NUMBER = r"(?P<number>[+\-−]?\d+(?:\.\d+)?)"
NOTE_RE = re.compile(r"<!-- (?P<kind>cell|pair|mpair|study|run|diff)(?:@(?P<src>[\w-]+))?: "
                     r"(?P<args>[^>]*?) -->")
ANNOTATED_RE = re.compile(NUMBER + r"\s*" + NOTE_RE.pattern)


class FindingsError(ValueError):
    """An annotation that names nothing in the study, or a malformed one."""


# ---- reading the study ------------------------------------------------------

def load_study(study_dir: Path = STUDY) -> dict:
    """summary.json and the folder its run records are read from."""
    summary = json.loads((Path(study_dir) / "summary.json").read_text())
    return {"summary": summary, "dir": Path(study_dir)}


def _cell(summary: dict, dataset: str, preset: str, head: str) -> dict:
    for c in summary["cells"]:
        if (c["dataset"], c["preset"], c["head"]) == (dataset, preset, head):
            return c
    raise FindingsError(f"no cell {dataset} {preset} {head} in summary.json")


def oriented_pair(summary: dict, dataset: str, preset: str, a: str, b: str,
                  metric: str | None = None) -> dict:
    """The summary's pair of heads a and b, as a − b: of the accuracies, or
    of the embedding metric `metric` (``metric_pairs``)."""
    pairs = summary["pairs"] if metric is None else summary.get("metric_pairs", [])
    for p in pairs:
        if (p["dataset"], p["preset"]) != (dataset, preset) or p.get("metric") != metric:
            continue
        if (p["a"], p["b"]) == (a, b):
            return p
        if (p["a"], p["b"]) == (b, a):
            ci = p["ci95"]
            return dict(p, a=a, b=b, mean_diff=-p["mean_diff"],
                        diffs=[-x for x in p["diffs"]],
                        ci95=None if ci is None or None in ci else [-ci[1], -ci[0]])
    raise FindingsError(f"no {a} − {b} pair{'' if metric is None else ' of ' + metric} for "
                        f"{dataset} {preset} in summary.json")


def _peak(r: dict) -> tuple[float, int]:
    acc = r["history"]["test_accuracy"]
    i = max(range(len(acc)), key=acc.__getitem__)
    return 100 * acc[i], r["history"]["epochs"][i]


def _share(counts: list, edges: list, lo: float, hi: float) -> float:
    """% of a histogram's counts in the bins within [lo, hi)."""
    inside = sum(c for c, e0, e1 in zip(counts, edges, edges[1:]) if e0 >= lo and e1 <= hi)
    return 100 * inside / sum(counts)


def _theta_share(r: dict, lo: float, hi: float = 180.0) -> float:
    """% of the test set whose angle to its own class weight is in [lo, hi)."""
    h = r.get("theta_hist") or {}
    counts, edges = h.get("counts"), h.get("edges", [])
    if not counts or lo not in edges or hi not in edges:
        raise FindingsError(f"run {r.get('name')}: theta_share needs bounds on the angle "
                            f"histogram's bin edges (every 2°), got {lo:g} and {hi:g}")
    return _share(counts, edges, lo, hi)


RUN_FIELDS = {
    "test_accuracy": lambda r: 100 * r["test_accuracy"],             # final, %
    "test_accuracy_plain": lambda r: 100 * r["test_accuracy_plain"],  # margin-free, %
    "peak_accuracy": lambda r: _peak(r)[0],                           # best epoch, %
    "peak_epoch": lambda r: _peak(r)[1],
    "final_train_loss": lambda r: r["history"]["train_loss"][-1],
}
THETA_FIELD = re.compile(r"theta_share_(\d+)(?:_(\d+))?$")  # theta_share_140, theta_share_148_160
# trapped_epoch_3: % of the first 1,000 test images at θ_y ≥ 140° after epoch 3
# (history.theta_hist)
TRAPPED_EPOCH_FIELD = re.compile(r"trapped_epoch_(\d+)$")


def _run(study: dict, name: str) -> dict:
    if name.startswith("extra/"):
        path = study["dir"] / name / "results.json"
        if not path.exists():
            raise FindingsError(f"run {name}: {path} does not exist")
        runs = json.loads(path.read_text())["runs"]
        if len(runs) != 1:
            raise FindingsError(f"run {name}: expected one run in {path}, found {len(runs)}")
        return runs[0]
    return _record(study["dir"] / "runs", name)


def _record(runs_dir: Path, name: str) -> dict:
    """The run record runs_dir/NAME.json."""
    path = Path(runs_dir) / f"{name}.json"
    if not path.exists():
        raise FindingsError(f"run {name}: {path} does not exist")
    return json.loads(path.read_text())


def _path(value, dotted: str, what: str):
    for part in dotted.split("."):
        try:
            value = value[int(part)] if isinstance(value, list) else value[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise FindingsError(f"{what}: no field {dotted!r}") from None
    return value


KINDS = ("cell", "pair", "mpair", "study", "run")


def lookup(study: dict, kind: str, args: str) -> float:
    """The study's value an annotation names."""
    summary, words = study["summary"], args.split()
    if kind == "diff":
        parts = [part.split(None, 1) for part in args.split("|")]
        if len(parts) != 2 or any(len(part) != 2 or part[0] not in KINDS for part in parts):
            raise FindingsError(f"'diff: {args}': expected 'KIND ARGS | KIND ARGS' with KIND "
                                f"one of {', '.join(KINDS)}")
        return lookup(study, *parts[0]) - lookup(study, *parts[1])
    if kind not in KINDS:
        raise FindingsError(f"unknown annotation kind {kind!r}")
    shapes = {"cell": 4, "pair": 5, "mpair": 6, "study": 1, "run": 2}
    if len(words) != shapes[kind]:
        raise FindingsError(f"'{kind}: {args}': expected {shapes[kind]} words after '{kind}:'")
    if kind == "cell":
        value = _path(_cell(summary, *words[:3]), words[3], f"cell {' '.join(words[:3])}")
    elif kind == "pair":
        value = _path(oriented_pair(summary, *words[:4]), words[4],
                      f"pair {' '.join(words[:4])}")
    elif kind == "mpair":
        value = _path(oriented_pair(summary, *words[:4], metric=words[4]), words[5],
                      f"mpair {' '.join(words[:5])}")
    elif kind == "study":
        value = _path(summary, words[0], "summary.json")
    else:
        record, field = _run(study, words[0]), words[1]
        theta, trapped = THETA_FIELD.match(field), TRAPPED_EPOCH_FIELD.match(field)
        if theta:
            value = _theta_share(record, float(theta[1]), float(theta[2] or 180))
        elif trapped:
            value = _epoch_trapped(record, int(trapped[1]))
        elif field in RUN_FIELDS:
            value = RUN_FIELDS[field](record)
        else:
            value = _path(record, field, f"run {words[0]}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise FindingsError(f"'{kind}: {args}' is {value!r}, not a number")
    return float(value)


# ---- tables -----------------------------------------------------------------

def _ci(ci, signed: bool = False) -> str:
    if ci is None or None in ci:
        return "–"
    f = "{:+.2f}" if signed else "{:.2f}"
    return "[" + ", ".join(f.format(x) for x in ci) + "]"


def _cells(summary: dict, dataset: str) -> list:
    """The grid's cells of `dataset` (the remedies' cells have a table of
    their own)."""
    order = {(p, h): i for i, (p, h) in enumerate((p, h) for p in PRESETS for h in HEADS)}
    cells = [c for c in summary["cells"] if c["dataset"] == dataset and c["head"] in HEADS]
    return sorted(cells, key=lambda c: order.get((c["preset"], c["head"]), len(order)))


def table_cells(summary: dict, dataset: str) -> str:
    rows = ["| preset | head | seeds | accuracy % (mean ± std) | 95 % CI | margin-free % "
            "| report % |", "|---|---|---|---|---|---|---|"]
    for c in _cells(summary, dataset):
        sd = f" ± {c['std']:.2f}" if c["n"] > 1 else ""
        report = "–" if c["report"] is None else f"{c['report']:.2f}"
        rows.append(f"| {c['preset']} | {HEAD_NAME[c['head']]} | {c['n']} | {c['mean']:.2f}{sd} "
                    f"| {_ci(c['ci95'])} | {c['margin_free_mean']:.2f} | {report} |")
    return "\n".join(rows)


def table_pairs(summary: dict, dataset: str) -> str:
    rows = ["| preset | A − B | pairs | mean difference (points) | 95 % CI | Wilcoxon p |",
            "|---|---|---|---|---|---|"]
    pairs = [p for p in summary["pairs"]
             if p["dataset"] == dataset and p["a"] in HEADS and p["b"] in HEADS]
    pairs.sort(key=lambda p: PRESETS.index(p["preset"]) if p["preset"] in PRESETS else 9)
    for p in pairs:
        pval = "–" if p["wilcoxon_p"] is None else f"{p['wilcoxon_p']:.3f}"
        rows.append(f"| {p['preset']} | {HEAD_NAME[p['a']]} − {HEAD_NAME[p['b']]} | {p['n']} "
                    f"| {p['mean_diff']:+.2f} | {_ci(p['ci95'], signed=True)} | {pval} |")
    return "\n".join(rows)


def table_headline(summary: dict) -> str:
    rows = ["| experiment | report | ours, the report's code | margin-free | `fair`, same head "
            "| `fair`: AdaFace − ArcFace (95 % CI) |", "|---|---|---|---|---|---|"]
    for dataset in ("mnist", "cifar10"):
        pair = oriented_pair(summary, dataset, "fair", "adaface", "arcface")
        for head in ("arcface", "adaface"):
            rep, fair = _cell(summary, dataset, "report", head), _cell(summary, dataset, "fair", head)
            answer = (f"{pair['mean_diff']:+.2f} {_ci(pair['ci95'], signed=True)}"
                      if head == "adaface" else "")
            rows.append(f"| {DATA_NAME[dataset]} {HEAD_NAME[head]} | {rep['report']:.2f} "
                        f"| {rep['mean']:.2f} ± {rep['std']:.2f} ({rep['n']} seeds) "
                        f"| {rep['margin_free_mean']:.2f} | {fair['mean']:.2f} ± {fair['std']:.2f} "
                        f"| {answer} |")
    return "\n".join(rows)


OPEN_METRICS = ("map_at_r", "precision_at_1", "tar_at_far_1e-3", "open_set_auroc", "trapped")
OPEN_LABELS = {"map_at_r": "MAP@R", "precision_at_1": "P@1", "tar_at_far_1e-3": "TAR@FAR=1e-3",
               "open_set_auroc": "open-set AUROC", "trapped": "trapped (θ_y ≥ 140°)"}
OPEN_PAIRED = ("map_at_r", "tar_at_far_1e-3", "open_set_auroc", "trapped")


def _open_head(head: str) -> str:
    return HEAD_NAME.get(head.removesuffix("-open"), head)


def _mean_sd(m: dict) -> str:
    return f"{m['mean']:.2f}" + (f" ± {m['std']:.2f}" if m["n"] > 1 else "")


def table_open_cells(summary: dict) -> str:
    """Every cell of the open-protocol study: seen-class accuracy and the
    embedding metrics on the unseen classes, in %."""
    rows = ["| data set | head | seeds | seen-class accuracy % | "
            + " | ".join(f"{OPEN_LABELS[n]} %" for n in OPEN_METRICS) + " |",
            "|---|---|---|---|" + "---|" * len(OPEN_METRICS)]
    order = {h: i for i, h in enumerate(HEADS)}
    cells = sorted(summary["cells"], key=lambda c: (list(DATA_NAME).index(c["dataset"]),
                                                    order.get(c["head"].removesuffix("-open"), 9)))
    for c in cells:
        metrics = c.get("metrics", {})
        cols = [_mean_sd(metrics[n]) if n in metrics else "–" for n in OPEN_METRICS]
        rows.append(f"| {DATA_NAME[c['dataset']]} | {_open_head(c['head'])} | {c['n']} | "
                    f"{_mean_sd(c)} | " + " | ".join(cols) + " |")
    return "\n".join(rows)


def table_open_pairs(summary: dict) -> str:
    """The paired differences between heads of the open-protocol study."""
    rows = ["| data set | A − B | metric | pairs | mean difference (points) | 95 % CI | "
            "Wilcoxon p |", "|---|---|---|---|---|---|---|"]
    pairs = [p for p in summary.get("metric_pairs", []) if p["metric"] in OPEN_PAIRED]
    pairs.sort(key=lambda p: (list(DATA_NAME).index(p["dataset"]), OPEN_PAIRED.index(p["metric"]),
                              p["a"], p["b"]))
    for p in pairs:
        pval = "–" if p["wilcoxon_p"] is None else f"{p['wilcoxon_p']:.3f}"
        rows.append(f"| {DATA_NAME[p['dataset']]} | {_open_head(p['a'])} − {_open_head(p['b'])} "
                    f"| {OPEN_LABELS[p['metric']]} | {p['n']} | {p['mean_diff']:+.2f} | "
                    f"{_ci(p['ci95'], signed=True)} | {pval} |")
    return "\n".join(rows)


# The ArcFace remedies' cells (head names in the study, after their
# changes) in the order the remedies table shows them, and how it names them
REMEDIES = {"arcface-easy": "ArcFace, easy margin", "arcface-clip": "ArcFace, clipped angle",
            "arcface-straight-through": "ArcFace, straight-through",
            "combined-1-0.3-0.2": "combined (1, 0.3, 0.2)",
            "arcface-swarm2": "ArcFace, softmax warm-up 2", "arcface-mwarm5": "ArcFace, margin warm-up 5"}


def _history_trapped(counts: list, edges=None) -> float:
    """% of one epoch's histogram (history.theta_hist; bins `edges`, the
    record's diagnostics.edges_deg, default THETA_EDGES_DEG) at θ_y ≥
    metrics.TRAPPED_DEG."""
    from adaloss.metrics import TRAPPED_DEG
    from adaloss.training import THETA_EDGES_DEG
    edges = list(THETA_EDGES_DEG if edges is None else edges)
    if len(counts) != len(edges) - 1 or TRAPPED_DEG not in edges:
        raise FindingsError(f"a per-epoch θ_y histogram of {len(counts)} bins, expected "
                            f"{len(edges) - 1} with an edge at {TRAPPED_DEG:g}°")
    if sum(counts) <= 0:
        raise FindingsError("a per-epoch θ_y histogram with no images")
    return _share(counts, edges, TRAPPED_DEG, edges[-1])


def _epoch_trapped(record: dict, epoch: int) -> float:
    """% of a run's diagnostic images at θ_y ≥ 140° after `epoch` (1-based)."""
    per_epoch = record.get("history", {}).get("theta_hist") or []
    if not 1 <= epoch <= len(per_epoch):
        raise FindingsError(f"run {record.get('name')}: no θ_y histogram after epoch {epoch} "
                            f"(it has {len(per_epoch)})")
    edges = (record.get("diagnostics") or {}).get("edges_deg")
    return _history_trapped(per_epoch[epoch - 1], edges)


def remedy_runs(runs_dir: Path, dataset: str, preset: str, head: str, seeds: list) -> list:
    """The run records of one cell, in its seeds' order."""
    return [_record(runs_dir, f"{dataset}-{preset}-{head}-seed{seed}") for seed in seeds]


def table_remedies(summary: dict, dataset: str, runs_dir: Path) -> str:
    """The `fair` ArcFace, each of its remedies that has runs, CosFace and
    AdaFace: accuracy, the trapped share (θ_y ≥ 140°) after the first epoch
    (first 1,000 test images) and at the end (all test images), and the
    paired differences with ArcFace, CosFace and AdaFace (points)."""
    from adaloss.metrics import TRAPPED_DEG
    rows = ["| head | seeds | accuracy % (mean ± std) | trapped after epoch 1 % | "
            "trapped at the end % | − ArcFace | − CosFace | − AdaFace |",
            "|---|---|---|---|---|---|---|---|"]
    names = {"arcface": "ArcFace (fallback, the committed cell)", **REMEDIES,
             "cosface": "CosFace", "adaface": "AdaFace"}
    present = [c["head"] for c in summary["cells"]
               if (c["dataset"], c["preset"]) == (dataset, "fair")]
    # the fair preset's cells that are neither the grid's nor known remedies
    # (other settings, e.g. cosface-m0.3) come last, under their cell names
    names.update((h, h) for h in present if h not in names and h not in HEADS)
    for head, label in names.items():
        if head not in present:
            continue
        c = _cell(summary, dataset, "fair", head)
        runs = remedy_runs(runs_dir, dataset, "fair", head, c["seeds"])
        with_history = [r for r in runs if r.get("history", {}).get("theta_hist")]
        early = (f"{sum(_epoch_trapped(r, 1) for r in runs) / len(runs):.1f}"
                 if len(with_history) == len(runs) else "–")
        end = sum(_theta_share(r, TRAPPED_DEG) for r in runs) / len(runs)
        diffs = []
        for other in ("arcface", "cosface", "adaface"):
            if other == head or other not in present:
                diffs.append("–")
                continue
            p = oriented_pair(summary, dataset, "fair", head, other)
            ci = f" {_ci(p['ci95'], signed=True)}" if p["n"] > 1 else ""
            diffs.append(f"{p['mean_diff']:+.2f}{ci}")
        rows.append(f"| {label} | {c['n']} | {_mean_sd(c)} | {early} | {end:.1f} | "
                    + " | ".join(diffs) + " |")
    return "\n".join(rows)


def table(summary: dict, name: str, runs_dir: Path = STUDY / "runs") -> str:
    """The markdown table NAME (no trailing newline); the open-* tables take
    the open-protocol study's summary; the remedies table also reads the run
    records in `runs_dir`."""
    kind, _, dataset = name.partition("-")
    if name == "headline":
        return table_headline(summary)
    if kind == "remedies" and dataset in DATA_NAME:
        return table_remedies(summary, dataset, runs_dir)
    if name == "open-cells":
        return table_open_cells(summary)
    if name == "open-pairs":
        return table_open_pairs(summary)
    if kind in ("cells", "pairs") and dataset in DATA_NAME:
        return (table_cells if kind == "cells" else table_pairs)(summary, dataset)
    raise FindingsError(f"unknown table {name!r} (cells-DATASET, pairs-DATASET, headline, "
                        "remedies-DATASET, open-cells, open-pairs)")


def fill_tables(text: str, summary: dict, open_summary=None,
                runs_dir: Path = STUDY / "runs") -> str:
    """text with every marked table replaced by the one summary.json gives
    (the open-* tables: `open_summary`, a summary or a function returning
    one; the remedies table also reads the records in `runs_dir`)."""
    def one(m):
        source = summary
        if m["name"].startswith("open-"):
            if open_summary is None:
                raise FindingsError(f"table {m['name']}: no open-protocol study given")
            source = open_summary() if callable(open_summary) else open_summary
        return m[1] + table(source, m["name"], runs_dir) + "\n" + m[4]
    return TABLE_RE.sub(one, text)


# ---- annotated numbers -------------------------------------------------------

def _as_written(value: float, written: str) -> str:
    decimals = len(written.split(".")[1]) if "." in written else 0
    return f"{value:.{decimals}f}"


def check_numbers(text: str, study: dict, where: str = "", others=None) -> list:
    """Messages for annotated numbers that differ from the study (empty: all
    hold), and for annotations with no number right before them. `others`:
    {name: study dict or a function returning one} for annotations whose kind
    names another study (``cell@study-open``)."""
    problems = []
    found = set()
    others = dict(others or {})
    for m in ANNOTATED_RE.finditer(text):
        found.add(m.start("kind"))
        line = text.count("\n", 0, m.start()) + 1
        written = m["number"].replace("−", "-").lstrip("+")
        try:
            source = study
            if m["src"]:
                if m["src"] not in others:
                    raise FindingsError(f"unknown study {m['src']!r} (expected one of "
                                        f"{sorted(others)})")
                if callable(others[m["src"]]):
                    others[m["src"]] = others[m["src"]]()
                source = others[m["src"]]
            value = lookup(source, m["kind"], m["args"])
        except FindingsError as exc:
            problems.append(f"{where}:{line}: {exc}")
            continue
        if math.isnan(value) or _as_written(value, written) != written:
            problems.append(f"{where}:{line}: {m['number']} written, the study says "
                            f"{_as_written(value, written)} ({m['kind']}: {m['args']})")
    for m in NOTE_RE.finditer(text):
        if m.start("kind") not in found:
            line = text.count("\n", 0, m.start()) + 1
            problems.append(f"{where}:{line}: annotation '{m['kind']}: {m['args']}' "
                            "does not follow a number")
    return problems


def annotated_count(text: str) -> int:
    return len(ANNOTATED_RE.findall(text))


# ---- the command ------------------------------------------------------------

def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _shown(path: Path) -> Path:
    """path relative to the project when it is inside it."""
    try:
        return path.resolve().relative_to(ROOT)
    except ValueError:
        return path


def _lazy_study(study_dir: Path):
    """A function loading the study once, at its first call."""
    cache = {}

    def get():
        if "study" not in cache:
            if not (Path(study_dir) / "summary.json").exists():
                raise FindingsError(f"{_shown(Path(study_dir))}/summary.json does not exist")
            cache["study"] = load_study(study_dir)
        return cache["study"]
    return get


def check(files=None, study_dir: Path = STUDY, open_dir: Path = STUDY_OPEN) -> list:
    """Everything that differs: stale tables and annotated numbers that do not hold."""
    study = load_study(study_dir)
    open_study = _lazy_study(open_dir)
    problems = []
    for path in doc_files() if files is None else files:
        text = Path(path).read_text(encoding="utf-8")
        path = _shown(Path(path))
        try:
            filled = fill_tables(text, study["summary"], lambda: open_study()["summary"],
                                 Path(study_dir) / "runs")
        except FindingsError as exc:
            problems.append(f"{path}: {exc}")
            continue
        for m_old, m_new in zip(TABLE_RE.finditer(text), TABLE_RE.finditer(filled)):
            if m_old["body"] != m_new["body"]:
                line = text.count("\n", 0, m_old.start()) + 1
                problems.append(f"{path}:{line}: table {m_old['name']} differs from summary.json")
        problems += check_numbers(text, study, str(path), {"study-open": open_study})
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the tables in place")
    mode.add_argument("--check", action="store_true", help="exit 1 if anything differs (default)")
    parser.add_argument("--study", type=Path, default=STUDY, help="study folder (summary.json)")
    parser.add_argument("--open-study", type=Path, default=STUDY_OPEN,
                        help="the open-protocol study folder (summary.json)")
    args = parser.parse_args(argv)
    if args.write:
        summary = load_study(args.study)["summary"]
        open_study = _lazy_study(args.open_study)
        for path in doc_files():
            text = path.read_text(encoding="utf-8")
            new = fill_tables(text, summary, lambda: open_study()["summary"],
                              Path(args.study) / "runs")
            if new != text:
                _write_atomic(path, new)
                print(f"rewrote the tables of {path.relative_to(ROOT)}")
    problems = check(study_dir=args.study, open_dir=args.open_study)
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
