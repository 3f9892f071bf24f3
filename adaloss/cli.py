"""Command line: ``adaloss reproduce`` (also ``python -m adaloss``)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from . import datasets, get_num_threads, presets, runs, set_num_threads, study
from ._version import __version__
from .fileio import atomic_write

_MOVED = {"run_one": "adaloss.runs.run_one"}


def __getattr__(name: str):
    # deprecated aliases: the unit of work moved to adaloss.runs
    if name in _MOVED:
        warnings.warn(f"adaloss.cli.{name} is deprecated; use {_MOVED[name]}",
                      DeprecationWarning, stacklevel=2)
        return getattr(runs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _csv(items) -> str:
    return ",".join(items)


def _positive(value: str, least: int = 1) -> int:
    kind = "a positive" if least == 1 else "a non-negative"
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind} integer, got {value!r}") from None
    if n < least:
        raise argparse.ArgumentTypeError(f"expected {kind} integer, got {value!r}")
    return n


def _non_negative(value: str) -> int:
    return _positive(value, least=0)


def _positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not (x > 0 and np.isfinite(x)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return x


# The C core's limit on its thread count (adaloss.set_num_threads).
MAX_THREADS = 1024
# Learning rates above this are refused: Adam diverges far below it, and the
# presets use 1e-3 and 1e-4.
MAX_LR = 1.0


def _threads(value: str) -> int:
    n = _positive(value)
    if n > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_THREADS} threads (the C core's "
                                         f"limit; this machine has {os.cpu_count()} cores), "
                                         f"got {value!r}")
    return n


def _learning_rate(value: str) -> float:
    x = _positive_float(value)
    if x > MAX_LR:
        raise argparse.ArgumentTypeError(f"expected a learning rate of at most {MAX_LR:g} (Adam "
                                         f"diverges far below that; the presets use 1e-3 and "
                                         f"1e-4), got {value!r}")
    return x


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adaloss",
        description="Train and compare angular-margin losses (ArcFace, AdaFace, CosFace) on the "
                    "CPU, and reproduce the AdaLoss report.")
    p.add_argument("--version", action="version", version=f"adaloss {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "reproduce", help="train what a preset says and write a table, figures and results.json",
        description="Train every head of a preset on a data set, print the accuracy table, and "
                    "write results.json (every history and setting) and the figures to --out.")
    epochs = ", ".join(f"{n} for {d}" for d, n in presets.EPOCHS.items())
    r.add_argument("--dataset", choices=presets.DATASETS, required=True,
                   help=f"data set (the report's epochs: {epochs})")
    r.add_argument("--preset", choices=presets.PRESETS, default=presets.DEFAULT_PRESET,
                   help="report: the report's four experiments, quirks included; paper: the "
                        "published heads on the same networks; fair: one backbone for "
                        f"{', '.join(presets.HEADS)} (default: %(default)s)")
    r.add_argument("--epochs", type=_positive, default=None,
                   help=f"epochs per run (default: the report's, {epochs})")
    r.add_argument("--seeds", type=_positive, default=1,
                   help="number of seeds per head, 0..N-1 (default: 1)")
    r.add_argument("--heads", default=None,
                   help="comma-separated subset of the preset's heads (default: all)")
    r.add_argument("--data-root", default=None,
                   help="folder holding mnist/ and cifar-10-batches-bin/ (or -py/); default "
                        "$ADALOSS_DATA, else the user cache; downloads what is missing")
    r.add_argument("--out", default=None,
                   help="results folder (default: results/<dataset>-<preset>)")
    r.add_argument("--force", action="store_true",
                   help="replace an existing results folder (never done without it)")
    r.add_argument("--threads", type=_threads, default=None,
                   help=f"threads for the C core, 1..{MAX_THREADS} (default: all cores)")
    r.add_argument("--subset", type=_positive, default=None, metavar="N",
                   help="train on N random training images and test on N/5 (quick runs)")
    r.add_argument("--lr", type=_learning_rate, default=None,
                   help="Adam learning rate for every head, above 0 and at most "
                        f"{MAX_LR:g} (default: the preset's, 1e-3; 1e-4 for the report's "
                        "CIFAR-10 ArcFace network)")
    r.add_argument("--batch-size", type=_positive, default=None,
                   help=f"batch size (default: the report's {presets.BATCH_SIZE})")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--no-figures", action="store_true", help="write results.json only")
    st = sub.add_parser(
        "study", help="the multi-seed grid of presets x heads x data sets, resumable",
        description="Run preset x head x data set x seed in parallel processes (or on a Dask "
                    "cluster), one JSON file per finished run in OUT/runs/ (finished runs are "
                    "skipped on restart), and write OUT/summary.json and OUT/summary.md: mean, "
                    "std and 95 % CI per cell, paired comparisons with a Wilcoxon p-value.")
    st.add_argument("--datasets", default=_csv(presets.DATASETS),
                    help="comma-separated data sets (default: %(default)s)")
    st.add_argument("--presets", default=_csv(presets.PRESETS),
                    help="comma-separated presets (default: %(default)s)")
    st.add_argument("--seeds", default=_csv(f"{d}={n}" for d, n in presets.STUDY_SEEDS.items()),
                    help="seeds per data set: N for all, or DATASET=N,... (default: %(default)s)")
    st.add_argument("--heads", default=None,
                    help="comma-separated heads to run (default: every head of each preset)")
    st.add_argument("--out", default="results/study",
                    help="study folder, relative to the current folder (default: %(default)s)")
    st.add_argument("--epochs", type=_positive, default=None, help="default: the report's")
    st.add_argument("--subset", type=_positive, default=None, metavar="N",
                    help="train on N images, test on N/5 (quick runs)")
    st.add_argument("--data-root", default=None, help="as for reproduce")
    st.add_argument("--workers", type=_positive, default=None,
                    help="worker processes (default: cores / threads per worker)")
    st.add_argument("--threads-per-worker", type=_threads, default=1,
                    help=f"C-core threads in each worker, 1..{MAX_THREADS} (default: 1)")
    st.add_argument("--scheduler", default=None, metavar="ADDRESS",
                    help="send the runs to this Dask distributed scheduler instead")
    st.add_argument("--max-runs", type=_non_negative, default=None,
                    help="stop after this many new runs (resume later); 0 trains nothing and "
                         "only writes the summary of the runs finished so far")
    st.add_argument("--rerun-mismatched", action="store_true",
                    help="train again the runs whose records in OUT/runs were made with other "
                         "settings (subset, epochs, lr, ...), moving the old records to "
                         "OUT/runs/.mismatched/; without it such records stop the study")
    pl = sub.add_parser("plot", help="make the figures again from a results folder",
                        description="Make the figures of a results folder again from its "
                                    "results.json (the sample grid needs the data set).")
    pl.add_argument("folder", help="a folder written by 'adaloss reproduce'")
    pl.add_argument("--data-root", default=None, help="as for reproduce")
    return p


def summary_table(results: dict) -> str:
    """Markdown table: head, accuracy per seed, mean +- std, the report's number."""
    by_head: dict = {}
    for run in results["runs"]:
        by_head.setdefault(run["head"], []).append(run)
    lines = ["| head | accuracy per seed (%) | mean ± std (%) | margin-free (%) | report (%) |",
             "|---|---|---|---|---|"]
    for head, records in by_head.items():
        acc = np.array([100 * r["test_accuracy"] for r in records])
        plain = np.array([100 * r["test_accuracy_plain"] for r in records])
        std = f" ± {acc.std(ddof=1):.2f}" if len(acc) > 1 else ""
        rep = records[0]["config"].get("report_accuracy")
        lines.append(f"| {head} | {', '.join(f'{a:.2f}' for a in acc)} | {acc.mean():.2f}{std} | "
                     f"{plain.mean():.2f} | {rep if rep is not None else '–'} |")
    return "\n".join(lines)


def write_json(path: Path, obj) -> None:
    """obj as indented JSON, written atomically."""
    atomic_write(path, json.dumps(obj, indent=1).encode())


def make_figures(folder: Path, results: dict, data=None) -> list:
    """The figures of a results.json (PNG and SVG) in folder; the paths written."""
    from . import plots  # deferred on purpose: loads matplotlib, which --help and training skip

    written = []
    figs = plots.figures_from_results(results, data)
    for name, fig in figs.items():
        for ext in ("png", "svg"):
            path = folder / f"{name}.{ext}"
            plots.save(fig, path)
            written.append(path)
    return written


def _fail(message: str, code: int = 1) -> int:
    print(f"adaloss: {message}", file=sys.stderr)
    return code


def _os_error(exc: OSError) -> str:
    """What failed, with the path, from an OSError."""
    reason = exc.strerror or str(exc)
    return f"{reason}: {exc.filename}" if exc.filename else reason


def _set_aside(staging: Path) -> Path:
    """Move the unfinished results of an earlier run out of the way (never delete them)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(staging.stat().st_mtime))
    aside = staging.with_name(f"{staging.name}-{stamp}")
    n = 1
    while aside.exists():
        aside, n = staging.with_name(f"{staging.name}-{stamp}.{n}"), n + 1
    os.replace(staging, aside)
    return aside


def cmd_reproduce(args) -> int:
    out = Path(args.out or f"results/{args.dataset}-{args.preset}")
    if out.exists() and not out.is_dir():
        return _fail(f"--out: {out} is a file, not a folder", 2)
    try:
        if out.exists() and any(out.iterdir()) and not args.force:
            return _fail(f"{out} exists; choose another --out or pass --force to replace it", 2)
    except OSError as exc:
        return _fail(f"--out: cannot read {out} ({_os_error(exc)})", 2)
    configs = presets.runs(args.dataset, args.preset, args.epochs)
    if args.heads:
        wanted = [h.strip() for h in args.heads.split(",") if h.strip()]
        unknown = set(wanted) - {c.head for c in configs}
        if unknown:
            return _fail(f"--heads: {sorted(unknown)} not in the {args.preset} preset "
                         f"({[c.head for c in configs]})", 2)
        configs = [c for c in configs if c.head in wanted]
    if args.lr is not None:
        for config in configs:
            config.lr = args.lr
    if args.threads:
        if args.threads > (os.cpu_count() or 1):
            print(f"adaloss: --threads {args.threads} is more than this machine's "
                  f"{os.cpu_count()} cores; training will be slower, not faster",
                  file=sys.stderr)
        set_num_threads(args.threads)
    try:
        data = runs.load_data(args.dataset, args.data_root)
    except datasets.DataError as exc:
        return _fail(str(exc))
    if args.subset:
        if args.subset > len(data.train_labels):
            return _fail(f"--subset: {args.subset:,} training images asked for, but "
                         f"{args.dataset} has {len(data.train_labels):,}", 2)
        data = datasets.subset(data, args.subset, max(10, args.subset // 5))
    staging = out.with_name(out.name + ".partial")
    results = {"adaloss_version": __version__, "command": " ".join(["adaloss"] + sys.argv[1:]),
               "dataset": args.dataset, "preset": args.preset, "threads": None,
               "machine": platform.platform(), "subset": args.subset,
               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": []}
    results["threads"] = get_num_threads()
    action = f"moving aside the unfinished results in {staging}"
    try:
        if staging.exists():
            aside = _set_aside(staging)
            print(f"adaloss: {staging} held the unfinished results of an earlier run; moved "
                  f"them to {aside}", file=sys.stderr)
        action = f"creating {staging}"
        staging.mkdir(parents=True)
        t0 = time.perf_counter()
        interrupted = False
        for config in configs:
            for seed in range(args.seeds):
                print(f"== {config.name} seed {seed}: {config.epochs} epochs", flush=True)
                record = runs.run_one(config, seed, data, progress=not args.no_progress,
                                      batch_size=args.batch_size)
                results["runs"].append(record)
                results["wall_seconds"] = time.perf_counter() - t0
                action = f"writing {staging / 'results.json'}"
                write_json(staging / "results.json", results)
                acc = record["test_accuracy"]
                print(f"   test accuracy {100 * acc:.2f} % ({record['wall_seconds']:.0f} s)",
                      flush=True)
                if record["history"]["interrupted"]:
                    interrupted = True
                    break
            if interrupted:
                break
        table = summary_table(results)
        action = f"writing {staging / 'table.md'}"
        atomic_write(staging / "table.md", (table + "\n").encode())
        if not args.no_figures:
            action = f"writing the figures into {staging}"
            make_figures(staging, results, data)
        if out.exists():
            action = f"removing the old {out} (--force)"
            shutil.rmtree(out)
        action = f"renaming {staging} to {out}"
        os.replace(staging, out)
    except OSError as exc:
        kept = (f"; the {len(results['runs'])} finished run(s) are in "
                f"{staging / 'results.json'}" if results["runs"] and staging.exists() else "")
        return _fail(f"{action} failed ({_os_error(exc)}){kept}")
    print(table)
    print(f"wrote {out}/ (results.json, table.md{', figures' if not args.no_figures else ''}) "
          f"in {results['wall_seconds']:.0f} s")
    return 130 if interrupted else 0


_RESULT_FIELDS = (("dataset", str), ("preset", str), ("runs", list))
_RUN_FIELDS = (("head", str), ("history", dict), ("theta_hist", dict),
               ("sample_indices", list), ("sample_predictions", list))


def _check_results(results, path: Path) -> None:
    """ValueError naming the file and the field when results.json cannot be plotted."""
    def bad(field, expected, got):
        return ValueError(f"{path}: field {field!r}: expected {expected}, got {got!r:.80}")

    if not isinstance(results, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(results).__name__}")
    for key, kind in _RESULT_FIELDS:
        if not isinstance(results.get(key), kind):
            raise bad(key, f"a {kind.__name__}", results.get(key))
    if not results["runs"]:
        raise bad("runs", "at least one run", results["runs"])
    for i, run in enumerate(results["runs"]):
        if not isinstance(run, dict):
            raise bad(f"runs[{i}]", "an object", run)
        for key, kind in _RUN_FIELDS:
            if not isinstance(run.get(key), kind):
                raise bad(f"runs[{i}].{key}", f"a {kind.__name__}", run.get(key))
        losses = run["history"].get("train_loss")
        if not isinstance(losses, list) or not losses or not all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                for v in losses):
            raise bad(f"runs[{i}].history.train_loss", "a non-empty list of numbers", losses)
        for name in ("theta_hist", "quality_hist"):
            hist = run.get(name)
            if name == "quality_hist" and hist is None:
                continue
            if not (isinstance(hist, dict) and isinstance(hist.get("counts"), list)
                    and isinstance(hist.get("edges"), list)
                    and len(hist["edges"]) == len(hist["counts"]) + 1
                    and all(isinstance(v, (int, float)) for v in hist["counts"] + hist["edges"])):
                raise bad(f"runs[{i}].{name}", "{'counts': [n numbers], 'edges': [n + 1 numbers]}",
                          hist)
        for name in ("sample_indices", "sample_predictions"):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                       for v in run[name]):
                raise bad(f"runs[{i}].{name}", "a list of non-negative integers", run[name])
        if len(run["sample_indices"]) != len(run["sample_predictions"]):
            raise bad(f"runs[{i}].sample_predictions",
                      f"{len(run['sample_indices'])} predictions", run["sample_predictions"])


def _local_data(results: dict, root):
    """The data set of the sample grid if it is on this machine (never downloaded)."""
    loaders = {"mnist": datasets.load_mnist, "cifar10": datasets.load_cifar10}
    dataset = results["dataset"]
    if dataset not in loaders:
        print(f"adaloss: no sample grid: unknown data set {dataset!r}", file=sys.stderr)
        return None
    try:
        data = loaders[dataset](root, download=False)
    except (datasets.DataError, OSError) as exc:
        print(f"adaloss: no sample grid: the {dataset} data set is not on this machine (plot "
              f"never downloads; give --data-root): {str(exc).splitlines()[0]}", file=sys.stderr)
        return None
    largest = max((max(r["sample_indices"], default=-1) for r in results["runs"]), default=-1)
    if largest >= len(data.test_labels):
        print(f"adaloss: no sample grid: the results name test image {largest}, but the local "
              f"{dataset} test set has {len(data.test_labels)}", file=sys.stderr)
        return None
    return data


def cmd_plot(args) -> int:
    folder = Path(args.folder)
    path = folder / "results.json"
    if not path.is_file():
        return _fail(f"{path} not found (expected a folder written by 'adaloss reproduce')", 2)
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return _fail(f"{path}: not a readable JSON file ({exc})", 2)
    try:
        _check_results(results, path)
    except ValueError as exc:
        return _fail(str(exc), 2)
    data = _local_data(results, args.data_root)
    try:
        written = make_figures(folder, results, data)
    except OSError as exc:
        return _fail(f"writing the figures into {folder} failed ({_os_error(exc)})")
    for p in written:
        print(p)
    return 0


def _parse_seeds(text: str, names: list) -> dict:
    try:
        if "=" not in text:
            return {d: _positive(text) for d in names}
        seeds = {}
        for part in text.split(","):
            name, _, value = part.partition("=")
            seeds[name.strip()] = _positive(value)
        return seeds
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"--seeds: expected N or DATASET=N,... with N a positive integer, "
                         f"got {text!r} ({exc})") from None


def cmd_study(args) -> int:
    names = [d for d in args.datasets.split(",") if d]
    presets_ = [p for p in args.presets.split(",") if p]
    try:
        seeds = _parse_seeds(args.seeds, names)
        summary = study.study(names, presets_, seeds, args.out, epochs=args.epochs,
                              subset=args.subset, data_root=args.data_root,
                              workers=args.workers, threads_per_worker=args.threads_per_worker,
                              scheduler=args.scheduler, max_runs=args.max_runs,
                              heads=[h for h in args.heads.split(",") if h] if args.heads
                              else None, rerun_mismatched=args.rerun_mismatched)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        print(f"adaloss: {exc}", file=sys.stderr)
        return 2
    except study.RunsFailed as exc:
        print(exc.summary["table"])
        print(f"adaloss: {exc}", file=sys.stderr)
        return 1
    except (ImportError, OSError, study.FolderBusy) as exc:  # no Dask, a full disk, a busy folder
        print(f"adaloss: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        how = "terminated (SIGTERM)" if isinstance(exc, study.Terminated) else "interrupted"
        print(f"adaloss: study {how}; the finished runs are in {args.out}/runs, "
              "the same command resumes from them", file=sys.stderr)
        return 143 if isinstance(exc, study.Terminated) else 130
    print(summary["table"])
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.command == "reproduce":
        return cmd_reproduce(args)
    if args.command == "study":
        return cmd_study(args)
    return cmd_plot(args)


if __name__ == "__main__":
    sys.exit(main())
