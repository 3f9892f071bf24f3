"""The multi-seed study: preset x head x data set x seed, in parallel processes
or on a Dask cluster, resumable, with a statistical summary.

    adaloss study --datasets mnist,cifar10 --presets report,paper,fair \\
                  --seeds mnist=5,cifar10=3 --out results/study

Each finished run is one small JSON file in ``<out>/runs/`` (never weights:
the per-epoch checkpoints of unfinished runs in ``<out>/runs/.partial/`` go
as their runs finish); runs already there are skipped, and unfinished ones
continue from their last epoch, so an interrupted study resumes where it
stopped; cells that make the very same run (the paper and fair AdaFace runs)
are trained once and share the record. ``<out>/summary.json`` and
``<out>/summary.md`` (with the figures ``accuracy.png`` and ``pairs.png``)
hold per cell the mean, standard deviation and 95 % confidence interval over
seeds, and paired
comparisons between heads that share seeds (hence initial networks, for the
fair preset): the mean difference, its 95 % CI and an exact Wilcoxon
signed-rank p-value.
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import datasets as _datasets
from . import checkpoint, presets, runs, set_num_threads, stats
from ._version import __version__
from .fileio import atomic_write
from .metrics import TRAPPED_DEG
from .presets import PRESETS, REPORT_ACCURACY, STUDY_SEEDS, RunConfig
# the statistics live in adaloss.stats; their names stay importable from here
from .stats import ci_or_none, mean_ci, paired_differences, t_quantile_975, wilcoxon_signed_rank

__all__ = ["study", "plan", "summarize", "write_summary", "wilcoxon_signed_rank",
           "t_quantile_975", "ci_or_none", "RunsFailed", "RecordsMismatch", "FolderBusy",
           "Terminated", "run_task", "record_settings", "RECORD_SETTINGS", "LEGACY_DEFAULTS"]


class RunsFailed(RuntimeError):
    """Some runs of a study raised; the others were kept and summarised.

    ``failures`` maps each failed run's id to its exception; ``summary`` is the
    summary of the runs that did finish (also written to the folder)."""

    def __init__(self, failures: dict, summary: dict):
        self.failures, self.summary = failures, summary
        messages = {}
        for rid, exc in failures.items():
            messages.setdefault(f"{type(exc).__name__}: {exc}", []).append(rid)
        lines = [f"{len(failures)} run(s) failed; finished runs were kept and summarised "
                 "(a restart retries the failed ones):"]
        for message, rids in messages.items():
            lines.append(f"- {', '.join(rids)}: {message}")
        super().__init__("\n".join(lines))


class RecordsMismatch(ValueError):
    """Run records in the study folder were made with other settings than the
    ones asked for; nothing was trained or written. ``mismatches`` maps each
    record file to its differing settings {setting: (in the record, asked for)}."""

    def __init__(self, runs_dir, mismatches: dict):
        self.mismatches = mismatches
        lines = [f"{len(mismatches)} run record(s) in {runs_dir} were made with other settings "
                 "than this command asks for, so they do not count as its finished runs:"]
        for path, diffs in list(mismatches.items())[:10]:
            lines.append(f"- {Path(path).name}: " + "; ".join(
                f"{name} {_show(old)} in the record, {_show(new)} now"
                for name, (old, new) in diffs.items()))
        if len(mismatches) > 10:
            lines.append(f"- and {len(mismatches) - 10} more")
        lines.append("Use another --out for these settings, or pass --rerun-mismatched to train "
                     "those runs again (their old records are moved to runs/.mismatched/).")
        super().__init__("\n".join(lines))


class FolderBusy(RuntimeError):
    """Another study holds the lock of the study folder."""


class Terminated(KeyboardInterrupt):
    """The study process got SIGTERM; handled as Ctrl-C."""


_MISSING = object()


class _Legacy:
    """A setting an old record lacks, taken as its LEGACY_DEFAULTS value."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return self.value == other

    __hash__ = None


def _show(value) -> str:
    if isinstance(value, _Legacy):
        return f"(missing, taken as {json.dumps(value.value)})"
    return "(missing)" if value is _MISSING else json.dumps(value)


# The settings a run record must match to count as a finished run of the grid:
# every key of its "config" (RunConfig.to_dict(): layers, head arguments, lr,
# epochs, batch size, ...; compared as "config.<key>") and these record keys.
RECORD_SETTINGS = ("seed", "subset", "threads", "adaloss_version")
# The value a setting had before records held it: a record without the key
# matches this value. A key missing from a record and not listed here never
# matches. Adding a setting is one line: its key here with the value older
# records meant (e.g. "config.protocol": "closed"), plus, for a record key
# outside the config, its name in RECORD_SETTINGS.
LEGACY_DEFAULTS: dict = {}


def _trained_config(config, seed: int) -> dict:
    """The configuration a run of `config` records: an open run's head has one
    class per seen class (runs.run_one)."""
    fields = config.to_dict()
    if config.protocol == "open":
        fields["num_classes"] = len(runs.split_classes(config.num_classes, seed)[0])
    return fields


def record_settings(config, seed: int, subset, threads: int) -> dict:
    """{setting: value} that a run's record must hold to be reused for it."""
    settings = {f"config.{k}": v for k, v in _trained_config(config, seed).items()}
    settings.update(seed=seed, subset=subset, threads=threads, adaloss_version=__version__)
    assert set(settings) >= set(RECORD_SETTINGS), "record_settings misses a RECORD_SETTINGS key"
    return settings


def _differences(record: dict, settings: dict) -> dict:
    """{setting: (in the record, asked for)} where the record differs."""
    def get(name):
        where, key = (record.get("config", {}), name[7:]) if name.startswith("config.") \
            else (record, name)
        if key in where:
            return where[key]
        return _Legacy(LEGACY_DEFAULTS[name]) if name in LEGACY_DEFAULTS else _MISSING

    diffs = {name: (get(name), value) for name, value in settings.items()
             if not get(name) == value}
    for key in record.get("config", {}):        # a setting this version does not know
        if f"config.{key}" not in settings:
            diffs[f"config.{key}"] = (record["config"][key], _MISSING)
    return diffs


def _number(value, low=None, high=None) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and (low is None or value >= low)
            and (high is None or value <= high))


def _check_record(record, stem: str, full: bool = True) -> str | None:
    """What is wrong with a run record read from runs/<stem>.json, or None;
    `full=False` checks only what summarize reads."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    kinds = (("head", str), ("dataset", str), ("preset", str), ("seed", int))
    if full:
        kinds += (("name", str), ("config", dict), ("history", dict))
    for key, kind in kinds:
        if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
            return f"field {key!r}: expected a {kind.__name__}, got {record.get(key)!r:.60}"
    for key, low, high in (("test_accuracy", 0, 1), ("test_accuracy_plain", 0, 1),
                           ("wall_seconds", 0, None)):
        if not _number(record.get(key), low, high):
            return f"field {key!r}: expected a number in [{low}, {high or 'inf'}], got " \
                   f"{record.get(key)!r:.60}"
    if "threads" in record and not (isinstance(record["threads"], int)
                                    and not isinstance(record["threads"], bool)
                                    and record["threads"] >= 1):
        return f"field 'threads': expected a positive int, got {record['threads']!r:.60}"
    if not full:
        return None
    history = record["history"]
    epochs = history.get("epochs")
    if not isinstance(epochs, list):
        return f"field 'history.epochs': expected a list, got {epochs!r:.60}"
    for key in ("train_loss", "test_accuracy"):
        values = history.get(key)
        if not isinstance(values, list) or len(values) != len(epochs) or not all(
                v is None or _number(v) for v in values):
            return f"field 'history.{key}': expected {len(epochs)} numbers, got {values!r:.60}"
    if f"{record['name']}-seed{record['seed']}" != stem:
        return (f"it holds run {record['name']}-seed{record['seed']}, not {stem} (a file "
                "copied or renamed by hand?)")
    return None


def _read_record(path: Path, full: bool = True):
    """(record, None) for a valid run record file, else (None, what is wrong)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"not a readable JSON file ({type(exc).__name__}: {exc})"
    problem = _check_record(record, path.stem, full)
    return (None, problem) if problem else (record, None)


def _move_aside(path: Path, folder: str) -> Path:
    """Move a record file into runs/<folder>/ (never over an earlier one)."""
    dest_dir = path.parent / folder
    dest_dir.mkdir(exist_ok=True)
    dest = dest_dir / path.name
    n = 1
    while dest.exists():
        dest, n = dest_dir / f"{path.stem}.{n}{path.suffix}", n + 1
    os.replace(path, dest)
    return dest


def _set_aside_bad_records(runs_dir: Path) -> dict:
    """Bad record files (truncated, mistyped, foreign) are moved to runs/.bad/
    with a message: their runs count as not done, and no later study stops on
    them. Returns the good records read, {path: record}, in name order."""
    good = {}
    for path in sorted(runs_dir.glob("*.json")):
        record, problem = _read_record(path)
        if problem is not None:
            dest = _move_aside(path, ".bad")
            print(f"study: {path} is not a valid run record ({problem}); moved to {dest}, its "
                  "run counts as not done", file=sys.stderr, flush=True)
        else:
            good[path] = record
    return good


@contextmanager
def _folder_lock(out: Path):
    """Hold out/.lock (flock, released by the system when the process dies, so a
    killed study never blocks the next); FolderBusy if another process holds it."""
    import fcntl  # deferred on purpose: POSIX only, like the lock

    path = out / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise FolderBusy(f"{out} is in use by another study (process {holder}, which holds "
                         f"{path}); wait for it to finish or choose another --out") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)        # releases the lock; the file stays (removing it would race)


def _on_sigterm(signum, frame):
    raise Terminated("terminated by SIGTERM")


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM stops the study like Ctrl-C (runs in progress dropped, workers
    ended), unless the program installed its own SIGTERM handler."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _worker_init(parent: int) -> None:
    """Run in each worker process first: the worker ends when the study process
    does, even one killed by SIGKILL (then no one else would end it, and an idle
    worker waits for work forever)."""
    watch = True
    if sys.platform.startswith("linux"):
        try:
            import ctypes  # deferred on purpose: only in workers, only on Linux

            libc = ctypes.CDLL(None, use_errno=True)
            watch = libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0    # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:          # the study ended before the line above
        os._exit(1)
    if watch:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


# The training-set sizes of the data sets, to refuse a --subset beyond them early.
TRAIN_SIZES = {"mnist": 60000, "cifar10": 50000}


def plan(datasets, presets_, seeds: dict, epochs=None, heads=None, overrides=None,
         protocol="closed") -> list:
    """(run id, config, seed) of every run in the grid, seed by seed within a
    data set, so that an unfinished grid holds whole seeds of every cell (and
    paired comparisons) rather than all seeds of the first cells. `heads`
    keeps only the runs of those heads (None: every head of each preset; the
    fair preset's EXTRA_HEADS run only when named, or, for "combined", when
    `overrides` sets m1, m2 or m3). `overrides`: head settings and warm-ups
    for presets.with_overrides (checked before anything runs). `protocol`
    "open" names the runs ``...-open-seedN``."""
    datasets, presets_ = list(datasets), list(presets_)
    if not datasets or set(datasets) - set(presets.DATASETS):
        raise ValueError(f"datasets: expected some of {presets.DATASETS}, got {datasets!r}")
    if not presets_ or set(presets_) - set(presets.PRESETS):
        raise ValueError(f"presets: expected some of {presets.PRESETS}, got {presets_!r}")
    missing = [d for d in datasets if d not in seeds]
    if missing:
        raise ValueError(f"seeds: no seed count for {missing}")
    for dataset in datasets:
        n = seeds[dataset]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"seeds: expected a positive number of seeds for {dataset}, got {n!r}")
    if protocol not in presets.PROTOCOLS:
        raise ValueError(f"protocol: expected one of {presets.PROTOCOLS}, got {protocol!r}")
    if heads is not None:
        heads = list(heads)
        known = presets.HEADS + presets.EXTRA_HEADS
        unknown = sorted(set(heads) - set(known))
        if unknown or not heads:
            raise ValueError(f"heads: expected some of {known}, got {heads!r}")
    overrides = dict(overrides or {})
    extra = [h for h in presets.EXTRA_HEADS if (heads and h in heads) or
             (h == "combined" and any(overrides.get(k) is not None for k in ("m1", "m2", "m3")))]
    if extra and "fair" not in presets_:
        raise ValueError(f"heads: {extra} belong to the fair preset, which is not in {presets_!r}")
    grid = {}
    for dataset in datasets:
        for preset in presets_:
            configs = presets.runs(dataset, preset, epochs, extra if preset == "fair" else ())
            configs = [c for c in configs if heads is None or c.head in heads or c.head in extra]
            grid[dataset, preset] = presets.with_overrides(configs, strict=False, **overrides)
    taken = {c.head for configs in grid.values() for c in configs}
    # what no head of the whole grid takes is an error (as for one preset)
    presets.with_overrides([c for configs in grid.values() for c in configs], **overrides)
    if not taken:
        raise ValueError(f"heads: none of {heads!r} is in the presets {presets_!r}")
    tasks = []
    for dataset in datasets:
        for seed in range(seeds[dataset]):
            for preset in presets_:
                for config in grid[dataset, preset]:
                    config.protocol = protocol
                    tasks.append((f"{config.name}-seed{seed}", config, seed))
    return tasks


_FLAGS = {"rule": "arcface-rule"}     # override name -> its command-line flag

_DATA_CACHE: dict = {}


def _load(dataset: str, data_root, subset):
    key = (dataset, str(data_root), subset)
    if key not in _DATA_CACHE:
        data = runs.load_data(dataset, data_root)
        if subset:
            if subset > len(data.train_labels):
                raise ValueError(f"subset: {subset:,} training images asked for, but {dataset} "
                                 f"in {data_root or 'the default data root'} has "
                                 f"{len(data.train_labels):,}")
            data = _datasets.subset(data, subset, max(10, subset // 5))
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = data
    return _DATA_CACHE[key]


# Where a study keeps the per-epoch checkpoints of its unfinished runs:
# OUT/runs/.partial/RUN-ID/ (latest.ckpt and settings.json, the settings the
# checkpoint belongs to). A run resumes from its last finished epoch; the
# folder goes once the run's record is written.
PARTIAL = ".partial"


def _partial_settings(config_dict: dict, seed: int, subset) -> dict:
    """What a run's checkpoint must have been made with to be resumed: its
    configuration but the epochs (a longer run continues a shorter one), seed,
    subset and adaloss version."""
    config = {k: v for k, v in config_dict.items() if k != "epochs"}
    return {"config": config, "seed": seed, "subset": subset, "adaloss_version": __version__}


def _drop_finished_partials(runs_dir: Path, progress: bool) -> None:
    """Remove the checkpoints of runs whose record is in the folder (a study
    stopped between writing a record and removing its checkpoint)."""
    partial = runs_dir / PARTIAL
    if not partial.is_dir():
        return
    for folder in sorted(partial.iterdir()):
        if (runs_dir / f"{folder.name}.json").exists():
            shutil.rmtree(folder, ignore_errors=True)
            if progress:
                print(f"study: removed {folder}, the checkpoint of a finished run", flush=True)


def _discard(folder: Path, why: str) -> None:
    if folder.exists():
        print(f"study: {folder.name}: discarded its checkpoint ({why}); training it from the "
              "start", file=sys.stderr, flush=True)
    shutil.rmtree(folder, ignore_errors=True)


def _prepare_partial(folder: Path, settings: dict) -> None:
    """Keep `folder`'s checkpoint only if it was made with `settings`; else
    (another configuration, a settings file missing or unreadable) start the
    run over, with a message. A checkpoint that is not a file (damaged by
    hand) goes too: the run would fail on it at every start."""
    path, latest = folder / "settings.json", folder / checkpoint.LATEST
    try:
        same = json.loads(path.read_text(encoding="utf-8")) == settings
    except (OSError, ValueError):
        same = False
    why = None
    if not same:
        why = "made with other settings" if path.exists() else "no settings.json"
    elif latest.exists() and not latest.is_file():
        why = f"its {checkpoint.LATEST} is not a file"
    if why is not None:
        _discard(folder, why)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(settings, indent=1).encode())


def run_task(config_dict: dict, seed: int, data_root, subset, threads: int,
             checkpoint_dir=None) -> dict:
    """One run, in a worker process (or a Dask worker): returns its record.
    With `checkpoint_dir` (a PARTIAL folder), the run saves itself there after
    every epoch and resumes from there; a checkpoint that cannot be resumed
    (other settings, unreadable) is discarded and the run starts over."""
    set_num_threads(threads)
    config = RunConfig.from_dict(config_dict)
    data = _load(config.dataset, data_root, subset)
    if checkpoint_dir is None:
        record = runs.run_one(config, seed, data, progress=False)
    else:
        folder = Path(checkpoint_dir)
        settings = _partial_settings(config_dict, seed, subset)
        _prepare_partial(folder, settings)
        try:
            record = runs.run_one(config, seed, data, progress=False, checkpoint_dir=folder)
        except checkpoint.CheckpointError as exc:   # damaged, of other data, past the epochs
            _discard(folder, str(exc).splitlines()[0])
            _prepare_partial(folder, settings)
            record = runs.run_one(config, seed, data, progress=False, checkpoint_dir=folder)
    record.update(dataset=config.dataset, preset=config.preset, threads=threads,
                  subset=subset, adaloss_version=__version__)
    return record


def _config_of(record: dict, epochs):
    """The configuration this version gives a record's run, at `epochs` (None:
    the preset's): its preset's run for its data set and head, with the head
    settings, warm-ups and protocol the record's name carries (a run of
    another cell of the folder, e.g. cifar10-fair-arcface-easy or an open run,
    is matched against its own cell, not this command's overrides). None for
    a run no preset makes."""
    try:
        saved = presets.RunConfig.from_dict(record["config"])
        extra = [saved.head] if saved.head in presets.EXTRA_HEADS else []
        configs = presets.runs(record["dataset"], record["preset"], epochs, extra)
        config = next((c for c in configs if c.head == record["head"]), None)
        if config is None:
            return None
        head = saved.head_config
        overrides = {k: getattr(head, k) for k in ("s", "m", "h", "rule", "m1", "m2", "m3")
                     if getattr(head, k, None) is not None}
        config = presets.with_overrides([config], strict=False, margin_warmup=saved.margin_warmup,
                                        softmax_warmup=saved.softmax_warmup, **overrides)[0]
        config.protocol = saved.protocol
    except (TypeError, ValueError, KeyError):
        return None
    return config


def _same_run_key(config, seed: int) -> str:
    """Equal for two cells of the grid that make the very same run: the whole
    configuration but the preset's name (and its report number and notes)."""
    fields = config.to_dict()
    for name in ("preset", "report_accuracy", "notes"):
        fields.pop(name, None)
    return json.dumps([fields, seed], sort_keys=True)


def _twin(record: dict, config) -> dict:
    """The record of an identical run, filed under another cell."""
    twin = dict(record, name=config.name, preset=config.preset,
                same_run_as=record.get("same_run_as") or f"{record['name']}-seed{record['seed']}")
    twin["config"] = _trained_config(config, record["seed"])
    return twin


def _json_safe(value):
    """NaN (the CI of a single seed) as null, so the files are standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write(path: Path, record: dict) -> None:
    atomic_write(path, json.dumps(_json_safe(record), indent=1, allow_nan=False).encode())


FIGURES = ("accuracy.png", "pairs.png", "curves.png")   # and roc-*, scores-*, theta-*.png


def _curves_ok(curves) -> bool:
    """A record's metrics.curves as the figures read them (a malformed one is
    left out of the figures, not an error)."""
    if not isinstance(curves, dict) or not isinstance(curves.get("roc"), dict):
        return False
    lists = [curves.get(k) for k in ("cos_edges", "genuine_counts", "impostor_counts")] + \
        [curves["roc"].get(k) for k in ("far", "tar")]
    return all(isinstance(v, list) and v and all(_number(x) for x in v) for v in lists) \
        and len(curves["cos_edges"]) == len(curves["genuine_counts"]) + 1 \
        == len(curves["impostor_counts"]) + 1 and len(curves["roc"]["far"]) == \
        len(curves["roc"]["tar"]) and min(curves["roc"]["far"]) > 0


def _verification_runs(records: list) -> dict:
    """{(dataset, preset): the lowest-seed run of each head that holds
    verification curves}, for the ROC and score figures of a study."""
    out: dict = {}
    for r in sorted(records or [], key=lambda r: r.get("seed", 0)):
        curves = (r.get("metrics") or {}).get("curves") if isinstance(r.get("metrics"), dict) \
            else None
        if not _curves_ok(curves):
            continue
        cell = out.setdefault((r["dataset"], r["preset"]), {})
        cell.setdefault(_cell_head(r), r)
    return {key: list(cell.values()) for key, cell in sorted(out.items())}


def _theta_epochs_of(run: dict) -> dict | None:
    """A record's per-epoch θ_y histograms as plots.theta_epochs reads them, or
    None when they are missing or malformed (then the run is left out of the
    figure, never an error): one list of counts per epoch, all of one length,
    and bin edges from its diagnostics (a list of increasing numbers, one more
    than the bins) or, without diagnostics, 5° bins over 0-180. The copy holds
    only those checked fields."""
    history, diagnostics = run.get("history"), run.get("diagnostics", {})
    hist = history.get("theta_hist") if isinstance(history, dict) else None
    if not isinstance(hist, list) or not hist or not isinstance(hist[0], list) or not hist[0] \
            or not isinstance(diagnostics, dict):
        return None
    bins = len(hist[0])
    edges = diagnostics.get("edges_deg", [180.0 * i / bins for i in range(bins + 1)])
    if not isinstance(edges, list) or len(edges) != bins + 1 \
            or not all(_number(e) for e in edges) \
            or any(b <= a for a, b in zip(edges, edges[1:])):
        return None
    if not all(isinstance(h, list) and len(h) == bins and all(_number(c, 0) for c in h)
               for h in hist):
        return None
    return {"name": run.get("name"), "head": run.get("head"), "seed": run.get("seed"),
            "history": {"theta_hist": hist},
            "diagnostics": {"edges_deg": edges}}


def _theta_runs(records: list) -> dict:
    """{(dataset, preset): the lowest seed of each cell among its runs with
    per-epoch θ_y histograms (checked copies)}, for the θ-per-epoch figures of
    a study (the remedies' runs and every run since them)."""
    out: dict = {}
    for r in sorted(records or [], key=lambda r: r.get("seed", 0)):
        clean = _theta_epochs_of(r)
        if clean is not None:
            out.setdefault((r["dataset"], r["preset"]), {}).setdefault(_cell_head(r), clean)
    return {key: list(cell.values()) for key, cell in sorted(out.items())}


def write_summary(out, summary: dict, records: list | None = None) -> None:
    """summary.json, summary.md and the figures (accuracy.png, pairs.png and
    curves.png, the per-epoch curves of every run in out/runs; per data set and
    preset, roc-*.png and scores-*.png where runs have verification curves and
    theta-*.png where they have per-epoch θ_y histograms; `records`, those
    runs if the caller has read them already).

    Everything is written to temporary files first and renamed into place only
    when all were written, so a failure (a full disk) leaves the previous
    summary and figures together; a figure the new summary has no data for is
    removed rather than left beside it."""
    from . import plots  # deferred on purpose: loads matplotlib, only needed here

    out = Path(out)
    if records is None:
        records = _read_runs(out)
    footer = (f"\nMade by adaloss {summary['adaloss_version']} on {summary['created']}"
              + (f" with `{summary['command_hint']}`." if summary.get("command_hint") else ".")
              + "\n")
    contents = {"summary.json": json.dumps(_json_safe(summary), indent=1,
                                           allow_nan=False).encode(),
                "summary.md": (summary["table"] + "\n" + footer).encode()}
    figures = {}
    if summary["cells"]:
        figures["accuracy.png"] = lambda: plots.study_accuracy(summary)
    if any(p["diffs"] for p in summary["pairs"]):
        figures["pairs.png"] = lambda: plots.study_pairs(summary)
    if records:
        figures["curves.png"] = lambda: plots.study_curves(records)
    for (dataset, preset), runs_ in _verification_runs(records).items():
        # partial binds this data set's runs and title now, not at the call
        figures[f"roc-{dataset}-{preset}.png"] = functools.partial(
            plots.roc_curves, runs_,
            f"{dataset}, {preset}, each head's lowest seed: verification ROC")
        figures[f"scores-{dataset}-{preset}.png"] = functools.partial(
            plots.score_histograms, runs_,
            f"{dataset}, {preset}, each head's lowest seed: genuine and impostor cosines")
    for (dataset, preset), runs_ in _theta_runs(records).items():
        figures[f"theta-{dataset}-{preset}.png"] = functools.partial(
            plots.theta_epochs, runs_,
            f"{dataset}, {preset}, each cell's lowest seed: $\\theta_y$ of the first test "
            "images per epoch")
    staged = []
    try:
        for name, data in contents.items():
            staged.append((out / f".{name}.new", out / name))
            atomic_write(staged[-1][0], data)
        for name, make in figures.items():
            staged.append((out / f".{name}.new.png", out / name))
            plots.save(make(), staged[-1][0])
    except BaseException as exc:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, f"could not write the summary of {out} "
                                     f"({exc.strerror or exc}); the previous summary and "
                                     "figures were left as they were", exc.filename) from exc
        raise
    for tmp, dest in staged:
        os.replace(tmp, dest)
    stale = [out / name for name in FIGURES] + sorted(out.glob("roc-*.png")) \
        + sorted(out.glob("scores-*.png")) + sorted(out.glob("theta-*.png"))
    for path in stale:
        name = path.name
        if name not in figures and (out / name).exists():
            (out / name).unlink()
            print(f"study: removed {out / name}, which the summary no longer has data for",
                  file=sys.stderr, flush=True)


def study(datasets=("mnist",), presets=PRESETS, seeds=None, out="study",
          epochs=None, subset=None, data_root=None, workers=None, threads_per_worker=1,
          scheduler=None, max_runs=None, progress=True, heads=None, overrides=None,
          protocol="closed", rerun_mismatched=False) -> dict:
    """Run the grid (skipping finished runs) and write the summary; returns it.

    `seeds` is an int or {dataset: n}. `workers` defaults to the number of cores
    divided by `threads_per_worker`. `scheduler` is a Dask distributed address
    (or a dask Client) to send the runs to instead of local processes.
    `max_runs` stops after that many new runs (the rest wait for a resume).
    `heads` restricts the grid to those heads (e.g. the fair preset's arcface
    and adaface first); `overrides` changes head settings and adds warm-ups
    (plan). The summary covers every run in the folder. A run that
    raises does not stop the others: the finished runs are written and
    summarised, then RunsFailed names the failed ones (a restart retries them).
    `protocol` ("closed" or "open") is part of each run's name, and the summary
    holds the runs of that protocol only.

    A run's record is reused only when it holds the very settings asked for
    (see RECORD_SETTINGS); every record in the folder must, since the summary
    covers them all. Otherwise RecordsMismatch names the records and settings,
    unless `rerun_mismatched`, which moves them to runs/.mismatched/ and trains
    those of this grid again. Bad record files go to runs/.bad/. The
    folder is locked (out/.lock) while the study runs: a second study on it
    raises FolderBusy. SIGTERM stops the study like Ctrl-C (Terminated)."""
    datasets, presets = list(datasets), list(presets)
    if seeds is None:
        seeds = dict(STUDY_SEEDS)
    if isinstance(seeds, int):
        seeds = {d: seeds for d in datasets}
    if not isinstance(threads_per_worker, int) or threads_per_worker < 1:
        raise ValueError(f"threads_per_worker: expected a positive int, got {threads_per_worker!r}")
    tasks = plan(datasets, presets, seeds, epochs, heads, overrides,
                 protocol)   # checks the arguments first
    stats.require_scipy()    # the summary needs it: say so now, not after the training
    if subset is not None:
        if isinstance(subset, bool) or not isinstance(subset, int) or subset < 1:
            raise ValueError(f"subset: expected a positive int, got {subset!r}")
        larger = [f"{d} has {TRAIN_SIZES[d]:,}" for d in datasets
                  if d in TRAIN_SIZES and subset > TRAIN_SIZES[d]]
        if larger:
            raise ValueError(f"subset: {subset:,} training images asked for, but "
                             f"{' and '.join(larger)}")
    out = Path(out)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    with _folder_lock(out), _sigterm_as_interrupt():
        return _study_locked(out, tasks, datasets, presets, seeds, epochs, subset, data_root,
                             workers, threads_per_worker, scheduler, max_runs, progress, heads,
                             rerun_mismatched, overrides, protocol)


def _study_locked(out, tasks, datasets, presets, seeds, epochs, subset, data_root, workers,
                  threads_per_worker, scheduler, max_runs, progress, heads,
                  rerun_mismatched, overrides, protocol) -> dict:
    runs_dir = out / "runs"
    records = _set_aside_bad_records(runs_dir)
    _drop_finished_partials(runs_dir, progress)
    # Cells that make the very same run (the paper and fair AdaFace runs: same
    # network, head, optimizer and seed) are trained once; the other cell gets a
    # copy of the record marked "same_run_as".
    key = {rid: _same_run_key(c, seed) for rid, c, seed in tasks}
    present = {rid for rid, _, _ in tasks if (runs_dir / f"{rid}.json").exists()}
    planned = {rid: (config, seed) for rid, config, seed in tasks}
    finished, mismatches = {}, {}
    # every record in the folder is summarised under this command, so every
    # one must hold this command's settings, planned now or not (--heads)
    for path, record in records.items():
        config, seed = planned.get(path.stem) or (_config_of(record, epochs), record["seed"])
        if config is None:
            diffs = {"dataset/preset/head": (f"{record['dataset']}/{record['preset']}/"
                                             f"{record['head']}", _MISSING)}
        else:
            diffs = _differences(record, record_settings(config, seed, subset,
                                                         threads_per_worker))
        if diffs:
            mismatches[path] = diffs
        elif path.stem in planned:
            finished.setdefault(key[path.stem], record)
    if mismatches and not rerun_mismatched:
        raise RecordsMismatch(runs_dir, mismatches)   # nothing changed yet
    for path in mismatches:
        dest = _move_aside(path, ".mismatched")
        present.discard(path.stem)
        print(f"study: {path.name} was made with other settings "
              f"({', '.join(mismatches[path])}); moved to {dest}, "
              + ("the run is trained again" if path.stem in planned else
                 "it is not in this command's grid (run that grid to train it again)"),
              file=sys.stderr, flush=True)
    configs = {rid: c for rid, c, _ in tasks}
    todo, copied = [], 0
    for task in tasks:
        rid = task[0]
        if rid in present:
            continue
        if key[rid] in finished:
            _write(runs_dir / f"{rid}.json", _twin(finished[key[rid]], configs[rid]))
            copied += 1
        else:
            todo.append(task)
    done = len(tasks) - len(todo)
    first, twins = [], {}
    for task in todo:
        if key[task[0]] in twins:
            twins[key[task[0]]].append(task[0])
        else:
            twins[key[task[0]]] = []
            first.append(task)
    if max_runs is not None:
        first = first[:max_runs]
    if progress:
        print(f"study: {len(tasks)} runs, {done} already done"
              + (f" ({copied} of them copied from an identical run)" if copied else "")
              + f", {len(first)} to run now", flush=True)

    failures = {}

    def finish(rid: str, future) -> None:
        # one failed run must not cost the others: it is named at the end
        try:
            record = future.result()
            history = record["history"]
            failure = (RuntimeError(f"interrupted after {len(history['epochs'])} of "
                                    f"{configs[rid].epochs} epochs; not kept")
                       if history.get("interrupted") else None)
        except KeyboardInterrupt:  # a worker stopped by Ctrl-C before its training began
            failure = RuntimeError("interrupted; not kept")
        except Exception as exc:
            failure = exc
        if failure is not None:
            failures[rid] = failure
            if progress:
                print(f"  failed {rid}: {type(failure).__name__}: "
                      f"{str(failure).splitlines()[0]}", flush=True)
            return
        _write(runs_dir / f"{rid}.json", record)
        shutil.rmtree(runs_dir / PARTIAL / rid, ignore_errors=True)
        for twin in twins[key[rid]]:
            _write(runs_dir / f"{twin}.json", _twin(record, configs[twin]))
        if progress:
            print(f"  done {rid}" + "".join(f" (and {t})" for t in twins[key[rid]]), flush=True)

    args = [(rid, (c.to_dict(), seed, str(data_root) if data_root else None, subset,
                   threads_per_worker)) for rid, c, seed in first]
    if scheduler is not None:
        # Dask workers may not share this file system: no per-epoch checkpoints
        _run_dask(scheduler, args, finish)
    elif first:
        workers = workers or max(1, (os.cpu_count() or 1) // threads_per_worker)
        ctx = multiprocessing.get_context("spawn")  # OpenMP state does not survive fork
        pool = ProcessPoolExecutor(max_workers=min(workers, len(first)), mp_context=ctx,
                                   initializer=_worker_init, initargs=(os.getpid(),))
        try:
            futures = {pool.submit(run_task, *a, str(runs_dir / PARTIAL / rid)): rid
                       for rid, a in args}
            for fut in as_completed(futures):
                finish(futures[fut], fut)
        except BaseException:   # Ctrl-C, SIGTERM: stop now, not after every queued run
            _stop(pool)
            raise
        pool.shutdown()
        try:
            (runs_dir / PARTIAL).rmdir()       # once no unfinished run is left in it
        except OSError:
            pass
    records = [r for r in _read_runs(out) if r.get("protocol", "closed") == protocol]
    summary = summarize(out, planned=len(tasks), records=records)
    summary["command_hint"] = ("adaloss study --datasets " + ",".join(datasets) + " --presets "
                               + ",".join(presets) + " --seeds "
                               + ",".join(f"{d}={seeds[d]}" for d in datasets)
                               + (" --heads " + ",".join(heads) if heads else "")
                               + (f" --epochs {epochs}" if epochs else "")
                               + (f" --subset {subset}" if subset else "")
                               + "".join(f" --{_FLAGS.get(k, k.replace('_', '-'))} {v}"
                                         for k, v in (overrides or {}).items())
                               + (f" --protocol {protocol}" if protocol != "closed" else ""))
    write_summary(out, summary, records)
    if failures:
        raise RunsFailed(failures, summary)
    return summary


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel the queued runs and end the running ones (whose results would be lost)."""
    stop = getattr(pool, "terminate_workers", None)       # Python 3.14
    if stop is not None:
        stop()
        return
    # before 3.14 there is no public way to stop a running task; shutdown()
    # forgets the worker processes, so take them first
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.join(timeout=10)


def _run_dask(scheduler, args, finish) -> None:
    try:
        # deferred on purpose: Dask is optional (adaloss[dask]) and heavy
        from dask.distributed import Client, as_completed as dask_completed
    except ImportError as exc:
        raise ImportError("--scheduler needs Dask: pip install 'dask[distributed]'") from exc
    if isinstance(scheduler, Client):
        client = scheduler
    else:
        try:
            client = Client(scheduler)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ConnectionError(f"scheduler: cannot connect to a Dask scheduler at "
                                  f"{scheduler!r}: {exc}") from exc
    futures = {}
    try:
        for rid, a in args:
            futures[client.submit(run_task, *a, key=f"adaloss-{rid}", pure=False)] = rid
        for fut in dask_completed(list(futures)):
            finish(futures[fut], fut)
    except BaseException:       # Ctrl-C: take the queued and running runs off the cluster
        client.cancel(list(futures))
        raise
    finally:
        if client is not scheduler:
            client.close()


def _read_runs(out) -> list:
    """Every run record in out/runs; ValueError naming a file that lacks what
    summarize needs."""
    records = []
    for path in sorted((Path(out) / "runs").glob("*.json")):
        record, problem = _read_record(path, full=False)
        if problem is not None:
            raise ValueError(f"{path}: not a valid run record ({problem}); move it out of the "
                             "folder (a study moves such files to runs/.bad/)")
        records.append(record)
    return records


def _cell_head(record: dict) -> str:
    """The head column of a run's cell: the head, with what the run changes of
    its preset (the run name's suffix, e.g. "arcface-easy"), so that remedies
    get cells of their own beside the preset's head."""
    prefix = f"{record['dataset']}-{record['preset']}-"
    name = record.get("name", "")
    return name[len(prefix):] if name.startswith(prefix + record["head"]) else record["head"]


# The embedding metrics a cell summarises when every run of it has them (the
# records of runs with `metrics`, closed or open protocol), in %: name ->
# (label, where in the record's "metrics"; a float picks the entry of a list
# of {"far", "tar"} at that false-accept rate). "trapped" is the share of the
# test images whose angle to their own class weight is metrics.TRAPPED_DEG or
# more.
EMBEDDING_METRICS = {
    "map_at_r": ("MAP@R", ("retrieval", "map_at_r")),
    "precision_at_1": ("P@1", ("retrieval", "precision_at_1")),
    "tar_at_far_1e-3": ("TAR@FAR=1e-3", ("verification", "tar_at_far", 1e-3)),
    "roc_auc": ("ROC AUC", ("verification", "roc_auc")),
    "open_set_auroc": ("open-set AUROC", ("open_set", "class_weights", "auroc")),
    "open_set_auroc_gallery": ("open-set AUROC (gallery)", ("open_set", "gallery", "auroc")),
    "trapped": ("trapped", None),
}
# the metrics whose paired differences the summary table shows (summary.json
# holds them for every metric)
PAIRED_IN_TABLE = ("map_at_r", "tar_at_far_1e-3", "open_set_auroc", "trapped")


def _embedding_metric(record: dict, name: str) -> float | None:
    """One of EMBEDDING_METRICS of a run record, in %; None where the record
    does not have it."""
    if name == "trapped":
        hist = record.get("theta_hist")
        if not isinstance(hist, dict):
            return None
        counts, edges = hist.get("counts"), hist.get("edges")
        if not isinstance(counts, list) or not isinstance(edges, list) \
                or len(edges) != len(counts) + 1 \
                or not all(_number(v, 0) for v in counts) or not all(_number(v) for v in edges) \
                or sum(counts) == 0:
            return None
        inside = sum(c for c, e in zip(counts, edges) if e >= TRAPPED_DEG)
        return 100.0 * inside / sum(counts)
    value = record.get("metrics")
    for key in EMBEDDING_METRICS[name][1]:
        if isinstance(key, float):   # the entry of a {"far", "tar"} list at that rate
            value = next((e.get("tar") for e in value
                          if isinstance(e, dict) and e.get("far") == key), None) \
                if isinstance(value, list) else None
        else:
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            return None
    return 100.0 * value if _number(value) else None


def _metric_cells(rs: list) -> dict:
    """{metric: mean_ci + "values"} over the runs `rs` (sorted by seed), for
    the metrics every one of them has; none when no run has embedding
    metrics, so that studies made before them summarise as they did."""
    if not any("metrics" in r for r in rs):
        return {}
    out = {}
    for name in EMBEDDING_METRICS:
        values = [_embedding_metric(r, name) for r in rs]
        if values and None not in values:
            out[name] = dict(mean_ci(values), values=values)
    return out


def _pair(a: dict, b: dict, a_values: list, b_values: list, **extra) -> dict | None:
    """The paired comparison of cells a and b (values per seed, in their
    "seeds" order) over their common seeds, `extra` (the metric) after the
    heads; None when they share no seed."""
    common, diffs = paired_differences(dict(zip(a["seeds"], a_values)),
                                       dict(zip(b["seeds"], b_values)))
    if not common:
        return None
    stats = mean_ci(diffs)
    return {"dataset": a["dataset"], "preset": a["preset"], "a": a["head"], "b": b["head"],
            **extra, "n": len(common), "mean_diff": stats["mean"], "ci95": stats["ci95"],
            "wilcoxon_p": wilcoxon_signed_rank(diffs), "seeds": common, "diffs": diffs}


def summarize(out, planned: int | None = None, records: list | None = None) -> dict:
    """Cells (mean, std, CI), paired comparisons and CPU time of a study folder;
    `planned`, the grid's number of runs, marks a summary of an unfinished grid;
    `records`, the folder's runs if the caller has read them already."""
    if records is None:
        records = _read_runs(out)
    cells: dict = {}
    for r in records:
        cells.setdefault((r["dataset"], r["preset"], _cell_head(r)), []).append(r)
    cell_rows, pairs, metric_pairs = [], [], []
    for (dataset, preset, head), rs in sorted(cells.items()):
        rs = sorted(rs, key=lambda r: r["seed"])
        stats = mean_ci([100 * r["test_accuracy"] for r in rs])
        stats.update(dataset=dataset, preset=preset, head=head, seeds=[r["seed"] for r in rs],
                     accuracies=[100 * r["test_accuracy"] for r in rs],
                     margin_free_mean=float(np.mean([100 * r["test_accuracy_plain"] for r in rs])),
                     report=REPORT_ACCURACY.get((dataset, head)) if preset == "report" else None)
        metrics = _metric_cells(rs)
        if metrics:
            stats["metrics"] = metrics
        cell_rows.append(stats)
    groups: dict = {}
    for c in cell_rows:
        groups.setdefault((c["dataset"], c["preset"]), []).append(c)
    for cs in groups.values():
        for a, b in itertools.combinations(cs, 2):
            pair = _pair(a, b, a["accuracies"], b["accuracies"])
            if pair is None:
                continue
            pairs.append(pair)
            for name in EMBEDDING_METRICS:
                if name in a.get("metrics", {}) and name in b.get("metrics", {}):
                    metric_pairs.append(_pair(a, b, a["metrics"][name]["values"],
                                              b["metrics"][name]["values"], metric=name))
    cpu_seconds = sum(r["wall_seconds"] * r.get("threads", 1) for r in records
                      if "same_run_as" not in r)   # a copied run took no time
    summary = {"adaloss_version": __version__, "created": time.strftime("%Y-%m-%d %H:%M"),
               "cells": cell_rows, "pairs": pairs, "runs": len(records),
               "runs_planned": planned, "cpu_hours": cpu_seconds / 3600,
               "table": _table(cell_rows, pairs, cpu_seconds, len(records), planned,
                               metric_pairs)}
    if metric_pairs or any("metrics" in c for c in cell_rows):
        summary["metric_pairs"] = metric_pairs
    return summary


def _fmt_ci(ci) -> str:
    ci = ci_or_none(ci)
    return "–" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _metric_tables(cells, metric_pairs) -> list:
    """Markdown lines: each cell's embedding metrics, then the paired
    differences of those in PAIRED_IN_TABLE."""
    shown = [c for c in cells if c.get("metrics")]
    if not shown:
        return []
    names = [n for n in EMBEDDING_METRICS if any(n in c["metrics"] for c in shown)]
    lines = ["", "Embedding metrics, % (mean ± std over seeds; trapped: test images at "
             f"θ_y ≥ {TRAPPED_DEG:.0f}°):", "",
             "| data set | preset | head | seeds | "
             + " | ".join(EMBEDDING_METRICS[n][0] for n in names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for c in shown:
        cols = []
        for n in names:
            m = c["metrics"].get(n)
            cols.append("–" if m is None else f"{m['mean']:.2f}"
                        + (f" ± {m['std']:.2f}" if m["n"] > 1 else ""))
        lines.append(f"| {c['dataset']} | {c['preset']} | {c['head']} | {c['n']} | "
                     + " | ".join(cols) + " |")
    rows = [p for p in metric_pairs if p["metric"] in PAIRED_IN_TABLE]
    if rows:
        lines += ["", "| data set | preset | A − B | metric | pairs | mean difference (points) "
                  "| 95 % CI | Wilcoxon p |", "|---|---|---|---|---|---|---|---|"]
        for p in sorted(rows, key=lambda p: (p["dataset"], p["preset"],
                                             PAIRED_IN_TABLE.index(p["metric"]))):
            lines.append(f"| {p['dataset']} | {p['preset']} | {p['a']} − {p['b']} | "
                         f"{EMBEDDING_METRICS[p['metric']][0]} | {p['n']} | "
                         f"{p['mean_diff']:+.2f} | {_fmt_ci(p['ci95'])} | "
                         f"{p['wilcoxon_p']:.3f} |")
    return lines


def _table(cells, pairs, cpu_seconds, done: int, planned: int | None,
           metric_pairs=()) -> str:
    lines = ["| data set | preset | head | seeds | accuracy % mean ± std | 95 % CI | margin-free % "
             "| report % |", "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        spread = f" ± {c['std']:.2f}" if c["n"] > 1 else ""   # one seed: no spread
        lines.append(f"| {c['dataset']} | {c['preset']} | {c['head']} | {c['n']} | "
                     f"{c['mean']:.2f}{spread} | {_fmt_ci(c['ci95'])} | "
                     f"{c['margin_free_mean']:.2f} | {c['report'] if c['report'] else '–'} |")
    lines += ["", "| data set | preset | A − B | pairs | mean difference (points) | 95 % CI | "
              "Wilcoxon p |", "|---|---|---|---|---|---|---|"]
    for p in pairs:
        lines.append(f"| {p['dataset']} | {p['preset']} | {p['a']} − {p['b']} | {p['n']} | "
                     f"{p['mean_diff']:+.2f} | {_fmt_ci(p['ci95'])} | {p['wilcoxon_p']:.3f} |")
    lines += _metric_tables(cells, metric_pairs)
    lines += ["", f"CPU time of the grid: {cpu_seconds / 3600:.2f} CPU-hours (wall time x threads)."]
    if planned is not None and done < planned:
        lines.append(f"Unfinished grid: {done} of {planned} runs; the cells above hold the "
                     "seeds finished so far.")
    return "\n".join(lines)
