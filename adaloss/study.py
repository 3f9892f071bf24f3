"""The multi-seed study: preset x head x data set x seed, in parallel processes
or on a Dask cluster, resumable, with a statistical summary.

    adaloss study --datasets mnist,cifar10 --presets report,paper,fair \\
                  --seeds mnist=5,cifar10=3 --out results/study

Each finished run is one small JSON file in ``<out>/runs/`` (never weights);
runs already there are skipped, so an interrupted study resumes where it
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

import itertools
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from . import datasets as _datasets
from . import presets, runs, set_num_threads
from ._version import __version__
from .fileio import atomic_write
from .presets import PRESETS, REPORT_ACCURACY, STUDY_SEEDS, RunConfig
# the statistics live in adaloss.stats; their names stay importable from here
from .stats import ci_or_none, mean_ci, paired_differences, t_quantile_975, wilcoxon_signed_rank

__all__ = ["study", "plan", "summarize", "write_summary", "wilcoxon_signed_rank",
           "t_quantile_975", "ci_or_none", "RunsFailed", "run_task"]


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
            data = _datasets.subset(data, subset, max(10, subset // 5))
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = data
    return _DATA_CACHE[key]


def run_task(config_dict: dict, seed: int, data_root, subset, threads: int) -> dict:
    """One run, in a worker process (or a Dask worker): returns its record."""
    set_num_threads(threads)
    config = RunConfig.from_dict(config_dict)
    data = _load(config.dataset, data_root, subset)
    record = runs.run_one(config, seed, data, progress=False)
    record.update(dataset=config.dataset, preset=config.preset, threads=threads,
                  subset=subset, adaloss_version=__version__)
    return record


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
    twin["config"] = config.to_dict()
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


def write_summary(out, summary: dict, records: list | None = None) -> None:
    """summary.json, summary.md and the figures (accuracy.png, pairs.png and
    curves.png, the per-epoch curves of every run in out/runs; `records`, those
    runs if the caller has read them already)."""
    from . import plots  # deferred on purpose: loads matplotlib, only needed here

    out = Path(out)
    _write(out / "summary.json", summary)
    footer = (f"\nMade by adaloss {summary['adaloss_version']} on {summary['created']}"
              + (f" with `{summary['command_hint']}`." if summary.get("command_hint") else ".")
              + "\n")
    atomic_write(out / "summary.md", (summary["table"] + "\n" + footer).encode())
    if summary["cells"]:
        plots.save(plots.study_accuracy(summary), out / "accuracy.png")
    if any(p["diffs"] for p in summary["pairs"]):
        plots.save(plots.study_pairs(summary), out / "pairs.png")
    if records is None:
        records = _read_runs(out)
    if records:
        plots.save(plots.study_curves(records), out / "curves.png")


def study(datasets=("mnist",), presets=PRESETS, seeds=None, out="study",
          epochs=None, subset=None, data_root=None, workers=None, threads_per_worker=1,
          scheduler=None, max_runs=None, progress=True, heads=None, overrides=None,
          protocol="closed") -> dict:
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
    holds the runs of that protocol only."""
    datasets, presets = list(datasets), list(presets)
    if seeds is None:
        seeds = dict(STUDY_SEEDS)
    if isinstance(seeds, int):
        seeds = {d: seeds for d in datasets}
    if not isinstance(threads_per_worker, int) or threads_per_worker < 1:
        raise ValueError(f"threads_per_worker: expected a positive int, got {threads_per_worker!r}")
    tasks = plan(datasets, presets, seeds, epochs, heads, overrides,
                 protocol)   # checks the arguments first
    out = Path(out)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    # Cells that make the very same run (the paper and fair AdaFace runs: same
    # network, head, optimizer and seed) are trained once; the other cell gets a
    # copy of the record marked "same_run_as".
    key = {rid: _same_run_key(c, seed) for rid, c, seed in tasks}
    present = {rid for rid, _, _ in tasks if (runs_dir / f"{rid}.json").exists()}
    finished = {}
    for rid in present:
        record = json.loads((runs_dir / f"{rid}.json").read_text())
        if record.get("subset") == subset and record.get("threads") == threads_per_worker:
            finished.setdefault(key[rid], record)
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
        for twin in twins[key[rid]]:
            _write(runs_dir / f"{twin}.json", _twin(record, configs[twin]))
        if progress:
            print(f"  done {rid}" + "".join(f" (and {t})" for t in twins[key[rid]]), flush=True)

    args = [(rid, (c.to_dict(), seed, str(data_root) if data_root else None, subset,
                   threads_per_worker)) for rid, c, seed in first]
    if scheduler is not None:
        _run_dask(scheduler, args, finish)
    elif first:
        workers = workers or max(1, (os.cpu_count() or 1) // threads_per_worker)
        ctx = multiprocessing.get_context("spawn")  # OpenMP state does not survive fork
        pool = ProcessPoolExecutor(max_workers=min(workers, len(first)), mp_context=ctx)
        try:
            futures = {pool.submit(run_task, *a): rid for rid, a in args}
            for fut in as_completed(futures):
                finish(futures[fut], fut)
        except BaseException:   # Ctrl-C: stop now, not after every queued run
            _stop(pool)
            raise
        pool.shutdown()
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
    return [json.loads(p.read_text()) for p in sorted((Path(out) / "runs").glob("*.json"))]


def _cell_head(record: dict) -> str:
    """The head column of a run's cell: the head, with what the run changes of
    its preset (the run name's suffix, e.g. "arcface-easy"), so that remedies
    get cells of their own beside the preset's head."""
    prefix = f"{record['dataset']}-{record['preset']}-"
    name = record.get("name", "")
    return name[len(prefix):] if name.startswith(prefix + record["head"]) else record["head"]


def summarize(out, planned: int | None = None, records: list | None = None) -> dict:
    """Cells (mean, std, CI), paired comparisons and CPU time of a study folder;
    `planned`, the grid's number of runs, marks a summary of an unfinished grid;
    `records`, the folder's runs if the caller has read them already."""
    if records is None:
        records = _read_runs(out)
    cells: dict = {}
    for r in records:
        cells.setdefault((r["dataset"], r["preset"], _cell_head(r)), []).append(r)
    cell_rows, pairs = [], []
    for (dataset, preset, head), rs in sorted(cells.items()):
        rs = sorted(rs, key=lambda r: r["seed"])
        stats = mean_ci([100 * r["test_accuracy"] for r in rs])
        stats.update(dataset=dataset, preset=preset, head=head, seeds=[r["seed"] for r in rs],
                     accuracies=[100 * r["test_accuracy"] for r in rs],
                     margin_free_mean=float(np.mean([100 * r["test_accuracy_plain"] for r in rs])),
                     report=REPORT_ACCURACY.get((dataset, head)) if preset == "report" else None)
        cell_rows.append(stats)
    groups: dict = {}
    for c in cell_rows:
        groups.setdefault((c["dataset"], c["preset"]), []).append(c)
    for (dataset, preset), cs in groups.items():
        for a, b in itertools.combinations(cs, 2):
            common, diffs = paired_differences(dict(zip(a["seeds"], a["accuracies"])),
                                               dict(zip(b["seeds"], b["accuracies"])))
            if not common:
                continue
            stats = mean_ci(diffs)
            pairs.append({"dataset": dataset, "preset": preset, "a": a["head"], "b": b["head"],
                          "n": len(common), "mean_diff": stats["mean"], "ci95": stats["ci95"],
                          "wilcoxon_p": wilcoxon_signed_rank(diffs), "seeds": common,
                          "diffs": diffs})
    cpu_seconds = sum(r["wall_seconds"] * r.get("threads", 1) for r in records
                      if "same_run_as" not in r)   # a copied run took no time
    return {"adaloss_version": __version__, "created": time.strftime("%Y-%m-%d %H:%M"),
            "cells": cell_rows, "pairs": pairs, "runs": len(records), "runs_planned": planned,
            "cpu_hours": cpu_seconds / 3600,
            "table": _table(cell_rows, pairs, cpu_seconds, len(records), planned)}


def _fmt_ci(ci) -> str:
    ci = ci_or_none(ci)
    return "–" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _table(cells, pairs, cpu_seconds, done: int, planned: int | None) -> str:
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
    lines += ["", f"CPU time of the grid: {cpu_seconds / 3600:.2f} CPU-hours (wall time x threads)."]
    if planned is not None and done < planned:
        lines.append(f"Unfinished grid: {done} of {planned} runs; the cells above hold the "
                     "seeds finished so far.")
    return "\n".join(lines)
