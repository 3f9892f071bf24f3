"""Command line: ``adaloss reproduce``, ``study``, ``plot`` and ``evaluate``
(also ``python -m adaloss``)."""
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

from . import (_core, checkpoint, datasets, datasources, get_num_threads, presets, runs,
               set_num_threads, study)
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


def _number(value: str, least: float = 0.0, open_low: bool = False) -> float:
    kind = "a positive" if open_low else "a non-negative"
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind} number, got {value!r}") from None
    if not np.isfinite(x) or x < least or (open_low and x == least):
        raise argparse.ArgumentTypeError(f"expected {kind} number, got {value!r}")
    return x


def _non_negative_float(value: str) -> float:
    return _number(value)


def _head_options(p: argparse.ArgumentParser) -> None:
    """The head settings and margin schedules, the same for reproduce and study."""
    g = p.add_argument_group(
        "head settings and margin schedules",
        "Applied to the selected heads that take them (a run changed so is named after the "
        "change, e.g. cifar10-fair-arcface-easy); values are checked before anything is written.")
    g.add_argument("--s", type=_positive_float, default=None,
                   help="scale s of the CosFace, ArcFace, AdaFace and combined heads")
    g.add_argument("--m", type=_non_negative_float, default=None,
                   help="margin m of the CosFace, ArcFace and AdaFace heads, in [0, pi]")
    g.add_argument("--h", type=_non_negative_float, default=None, help="AdaFace's h")
    g.add_argument("--arcface-rule", choices=presets.ARCFACE_RULES, default=None,
                   help="the paper ArcFace's rule where theta + m nears pi (default: fallback, "
                        "insightface's original)")
    g.add_argument("--m1", type=_positive_float, default=None,
                   help="combined head's multiplicative margin, in (0, 10]; any of --m1/--m2/"
                        "--m3 adds the combined head (fair preset) to the runs; default margins "
                        f"{presets.COMBINED_MARGINS}")
    g.add_argument("--m2", type=_non_negative_float, default=None,
                   help="combined head's additive angular margin, in [0, pi]")
    g.add_argument("--m3", type=_non_negative_float, default=None,
                   help="combined head's additive cosine margin, in [0, pi]")
    g.add_argument("--margin-warmup", type=_non_negative, default=0, metavar="K",
                   help="raise the margins linearly from 0 over the first K epochs, per step")
    g.add_argument("--softmax-warmup", type=_non_negative, default=0, metavar="K",
                   help="train K epochs with the margins at 0 (a normalised softmax with the "
                        "head's s) before the margin (and its warm-up)")


def _overrides(args) -> dict:
    """The head settings and schedules given on the command line, for
    presets.with_overrides."""
    out = {"s": args.s, "m": args.m, "h": args.h, "rule": args.arcface_rule, "m1": args.m1,
           "m2": args.m2, "m3": args.m3, "margin_warmup": args.margin_warmup,
           "softmax_warmup": args.softmax_warmup}
    return {k: v for k, v in out.items() if v not in (None, 0)}


def _wants_combined(args) -> bool:
    return any(v is not None for v in (args.m1, args.m2, args.m3))


def _dataset(value: str) -> str:
    if value in presets.DATASETS or os.path.exists(os.path.expanduser(value)):
        return value
    raise argparse.ArgumentTypeError(
        f"invalid choice: {value!r} (expected {' or '.join(presets.DATASETS)}, or the path of an "
        "IDX folder, an image folder or an .npz file)")


def _fraction(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = float("nan")
    if not 0.0 < x < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {value!r}")
    return x


_DATASET_HELP = ("mnist, cifar10, or the path of your own data: a folder of IDX files (MNIST's "
                 "format), an image folder (train/ and test/ of class folders, or class folders "
                 "with --test-fraction) or an .npz with x_train, y_train, x_test, y_test "
                 "(docs/evaluation.md)")


# The C core's limit on its thread count (adaloss.set_num_threads).
MAX_THREADS = _core.MAX_THREADS
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
    r.add_argument("--dataset", type=_dataset, required=True,
                   help=f"{_DATASET_HELP} (the report's epochs: {epochs}; other data take the "
                        "MNIST networks and epochs for grey images, CIFAR-10's for colour)")
    r.add_argument("--protocol", choices=presets.PROTOCOLS, default="closed",
                   help="closed: train and test on every class; open: train on a seeded half "
                        "of the classes, measure retrieval, verification and open-set "
                        "recognition on the other half (default: %(default)s)")
    r.add_argument("--test-fraction", type=_fraction, default=None, metavar="F",
                   help="split an image folder without train/ and test/: a seeded fraction F "
                        "of each class is the test set")
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
    r.add_argument("--metrics-every-epoch", action="store_true",
                   help="also measure the embedding metrics after every epoch (about 20 s each "
                        "on the full MNIST test set, one thread; docs/evaluation.md)")
    r.add_argument("--no-models", action="store_true",
                   help="do not keep the final networks in OUT/models/ (adaloss evaluate "
                        "needs them)")
    _head_options(r)
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
                    help="comma-separated heads to run (default: every head of each preset; "
                         f"{', '.join(presets.EXTRA_HEADS)} (fair preset) only when named)")
    st.add_argument("--out", default="results/study",
                    help="study folder, relative to the current folder (default: %(default)s)")
    st.add_argument("--epochs", type=_positive, default=None, help="default: the report's")
    st.add_argument("--subset", type=_positive, default=None, metavar="N",
                    help="train on N images, test on N/5 (quick runs)")
    st.add_argument("--data-root", default=None, help="as for reproduce")
    st.add_argument("--protocol", choices=presets.PROTOCOLS, default="closed",
                    help="as for reproduce; open runs are named ...-open-seedN and a study "
                         "folder summarises the runs of its own protocol only "
                         "(default: %(default)s)")
    st.add_argument("--workers", type=_positive, default=None,
                    help="worker processes (default: cores / threads per worker)")
    st.add_argument("--threads-per-worker", type=_threads, default=1,
                    help=f"C-core threads in each worker, 1..{MAX_THREADS} (default: 1)")
    st.add_argument("--scheduler", default=None, metavar="ADDRESS",
                    help="send the runs to this Dask distributed scheduler instead")
    st.add_argument("--max-runs", type=_non_negative, default=None,
                    help="stop after this many new runs (resume later); 0 trains nothing and "
                         "only writes the summary of the runs finished so far")
    _head_options(st)
    st.add_argument("--rerun-mismatched", action="store_true",
                    help="train again the runs whose records in OUT/runs were made with other "
                         "settings (subset, epochs, lr, ...), moving the old records to "
                         "OUT/runs/.mismatched/; without it such records stop the study")
    pl = sub.add_parser("plot", help="make the figures again from a results folder",
                        description="Make the figures of a results folder again from its "
                                    "results.json (the sample grid needs the data set).")
    pl.add_argument("folder", help="a folder written by 'adaloss reproduce'")
    pl.add_argument("--data-root", default=None, help="as for reproduce")
    ev = sub.add_parser(
        "evaluate", help="embedding metrics of trained networks, without retraining",
        description="Measure retrieval, verification and (open protocol) open-set recognition "
                    "of the networks a results folder keeps in models/ (or of one checkpoint), "
                    "on a data set and protocol of your choice; print a Markdown table.")
    ev.add_argument("target", metavar="FOLDER|CHECKPOINT",
                    help="a folder written by 'adaloss reproduce', or one of its "
                         "models/*.ckpt")
    ev.add_argument("--dataset", type=_dataset, default=None,
                    help=f"{_DATASET_HELP}; default: the run's own data set")
    ev.add_argument("--protocol", choices=presets.PROTOCOLS, default=None,
                    help="default: the protocol each network was trained under")
    ev.add_argument("--data-root", default=None, help="as for reproduce")
    ev.add_argument("--subset", type=_positive, default=None, metavar="N",
                    help="N training images (the open protocol's gallery) and N/5 test images; "
                         "default: the run's own subset, if its data set is used")
    ev.add_argument("--test-fraction", type=_fraction, default=None, metavar="F",
                    help="as for reproduce; default: the run's own")
    ev.add_argument("--json", default=None, metavar="PATH", help="also write the metrics here")
    ev.add_argument("--threads", type=_positive, default=None,
                    help="threads for the C core (default: all cores)")
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


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def metrics_table(rows: list) -> str:
    """Markdown table of embedding metrics: `rows` are (run name, seed, metrics
    dict of ``runs.evaluate_model``). Percentages; open-set columns under the
    open protocol."""
    open_ = any(m.get("protocol") == "open" for _, _, m in rows)
    head = ["run", "seed", "protocol", "P@1 %", "MAP@R %", "ver. AUROC %", "EER %",
            "TAR@FAR=1e-3 %", "10-fold acc. %"]
    if open_:
        head += ["open-set AUROC % (weights / gallery)", "seen acc. %"]
    else:
        head += ["accuracy %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, seed, m in rows:
        if m.get("error"):
            lines.append(f"| {name} | {seed} | {m.get('protocol')} | error: {m['error']} |")
            continue
        ret, ver = m["retrieval"], m["verification"]
        tar = next((t["tar"] for t in ver["tar_at_far"] if abs(t["far"] - 1e-3) < 1e-12), None)
        cells = [name, str(seed), m["protocol"], _pct(ret["precision_at_1"]),
                 _pct(ret["map_at_r"]), _pct(ver["roc_auc"]), _pct(ver["eer"]), _pct(tar),
                 f"{_pct(ver['accuracy_mean'])} ± {_pct(ver['accuracy_std'])}"]
        if open_:
            osr = m.get("open_set") or {}
            weights = (osr.get("class_weights") or {}).get("auroc")
            gallery = (osr.get("gallery") or {}).get("auroc")
            cells += [f"{_pct(weights)} / {_pct(gallery)}", _pct(m.get("seen_accuracy"))]
        else:
            cells += [_pct(m.get("accuracy"))]
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({m["note"] for _, _, m in rows if m.get("note")})
    lines += [""] + [f"Note: {note}." for note in notes] if notes else []
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
    official = args.dataset in presets.DATASETS
    suffix = "" if args.protocol == "closed" else f"-{args.protocol}"
    name = args.dataset if official else datasources.dataset_name(args.dataset)
    out = Path(args.out or f"results/{name}-{args.preset}{suffix}")
    if out.exists() and not out.is_dir():
        return _fail(f"--out: {out} is a file, not a folder", 2)
    try:
        if out.exists() and any(out.iterdir()) and not args.force:
            return _fail(f"{out} exists; choose another --out or pass --force to replace it", 2)
    except OSError as exc:
        return _fail(f"--out: cannot read {out} ({_os_error(exc)})", 2)
    wanted = [h.strip() for h in args.heads.split(",") if h.strip()] if args.heads else None
    extra = [h for h in presets.EXTRA_HEADS if (wanted and h in wanted)
             or (h == "combined" and _wants_combined(args))]
    if extra and args.preset != "fair":
        return _fail(f"--heads/--m1/--m2/--m3: {extra} belong to the fair preset only, not "
                     f"{args.preset!r}", 2)
    # the heads and networks are the same on every data set: check the
    # selection and the overrides before any data is read or folder made
    heads = [c.head for c in presets.runs("mnist", args.preset, None, extra)]
    if wanted:
        unknown = set(wanted) - set(heads)
        if unknown:
            return _fail(f"--heads: {sorted(unknown)} not in the {args.preset} preset ({heads})",
                         2)
    selected = [c for c in presets.runs("mnist", args.preset, args.epochs, extra)
                if wanted is None or c.head in wanted + extra]
    try:
        presets.with_overrides(selected, **_overrides(args))
    except ValueError as exc:
        return _fail(str(exc), 2)
    if args.threads:
        if args.threads > (os.cpu_count() or 1):
            print(f"adaloss: --threads {args.threads} is more than this machine's "
                  f"{os.cpu_count()} cores; training will be slower, not faster",
                  file=sys.stderr)
        set_num_threads(args.threads)
    try:
        data = runs.load_data(args.dataset, args.data_root, args.test_fraction)
        configs = runs.configs(data, args.preset, args.epochs, args.protocol, extra)
        if args.protocol == "open":
            runs.split_classes(len(data.classes), 0)      # enough classes to split
    except (datasets.DataError, ValueError) as exc:
        return _fail(str(exc))
    if wanted is not None:
        configs = [c for c in configs if c.head in wanted + extra]
    configs = presets.with_overrides(configs, **_overrides(args))
    if args.lr is not None:
        for config in configs:
            config.lr = args.lr
    if args.subset:
        if args.subset > len(data.train_labels):
            return _fail(f"--subset: {args.subset:,} training images asked for, but "
                         f"{args.dataset} has {len(data.train_labels):,}", 2)
        data = datasets.subset(data, args.subset, max(10, args.subset // 5))
    staging = out.with_name(out.name + ".partial")
    results = {"adaloss_version": __version__, "command": " ".join(["adaloss"] + sys.argv[1:]),
               "dataset": data.name, "preset": args.preset, "protocol": args.protocol,
               "data": datasources.data_info(args.dataset, args.test_fraction),
               "threads": None, "machine": platform.platform(), "subset": args.subset,
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
                model = (None if args.no_models
                         else staging / "models" / f"{config.name}-seed{seed}.ckpt")
                action = f"training {config.name} seed {seed} into {staging}"
                record = runs.run_one(config, seed, data, progress=not args.no_progress,
                                      batch_size=args.batch_size, model_path=model,
                                      metrics_every_epoch=args.metrics_every_epoch)
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
        if any(r.get("metrics") for r in results["runs"]):
            table += "\n\nEmbedding metrics (docs/evaluation.md):\n\n" + metrics_table(
                [(r["name"], r["seed"], r["metrics"]) for r in results["runs"]
                 if r.get("metrics")])
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
    print(f"wrote {out}/ (results.json, table.md{', figures' if not args.no_figures else ''}"
          f"{', models/' if not args.no_models else ''}) "
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
    info = results.get("data") if isinstance(results.get("data"), dict) else {}
    source = info.get("source", dataset)
    try:
        if source in loaders:
            data = loaders[source](root, download=False)
        elif isinstance(source, str) and os.path.exists(source):   # the user's own data
            data = runs.load_data(source, root, info.get("test_fraction"))
        else:
            print(f"adaloss: no sample grid: data set {source!r} is not on this machine",
                  file=sys.stderr)
            return None
        if results.get("subset"):    # the sample indices are the subset's
            data = datasets.subset(data, results["subset"], max(10, results["subset"] // 5))
    except (datasets.DataError, OSError, ValueError) as exc:
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
                              else None, overrides=_overrides(args),
                              protocol=args.protocol,
                              rerun_mismatched=args.rerun_mismatched)
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


def _models(target: Path) -> tuple:
    """(checkpoint paths, results.json of their folder or None) of an evaluate target."""
    if target.is_dir():
        found = sorted((target / "models").glob("*.ckpt"))
        if not found:
            raise FileNotFoundError(f"{target}/models/ holds no .ckpt file (reproduce keeps the "
                                    "final networks there unless --no-models)")
        folder = target
    elif target.is_file():
        found = [target]
        folder = target.parent.parent if target.parent.name == "models" else None
    else:
        raise FileNotFoundError(f"{target}: no such folder or checkpoint")
    results = None
    if folder is not None and (folder / "results.json").exists():
        results = json.loads((folder / "results.json").read_text())
    return found, results


def evaluate_target(target, dataset=None, protocol=None, data_root=None, subset=None,
                    test_fraction=None) -> list:
    """(run name, seed, metrics) of every network of a results folder (or of one
    checkpoint): the data set is the run's own unless `dataset` is given (with
    the run's subset and test fraction, unless given); the protocol, each run's
    own unless given. The numbers equal results.json's for the same data and
    protocol."""
    paths, results = _models(Path(target))
    loaded = [(p, *runs.load_model(p)) for p in paths]
    own = results.get("data", {}) if results else {}
    if dataset is None:
        dataset = own.get("source") or (results or {}).get("dataset") or loaded[0][1].dataset
        if dataset not in presets.DATASETS and not Path(dataset).exists():
            raise datasets.DataError(f"{target}: the run's data set {dataset!r} is not there; "
                                     "give --dataset")
        if subset is None and results:
            subset = results.get("subset")
        if test_fraction is None:
            test_fraction = own.get("test_fraction")
    data = runs.load_data(dataset, data_root, test_fraction)
    if subset:
        data = datasets.subset(data, subset, max(10, subset // 5))
    rows = []
    for path, config, trainer, extra in loaded:
        shape = tuple(data.test_images.shape[1:])
        if shape != tuple(trainer.net.input_shape):
            raise ValueError(f"{path}: the network takes images {tuple(trainer.net.input_shape)}, "
                             f"the data set's are {shape}")
        proto = protocol or config.protocol
        seed = int(extra.get("seed", 0))
        seen = (extra.get("classes") or {}).get("seen") if proto == config.protocol else None
        metrics = runs.evaluate_model(trainer.net, trainer.head, data, proto, seed, seen)
        metrics["checkpoint"] = str(path)
        rows.append((config.name, seed, metrics))
    return rows


def cmd_evaluate(args) -> int:
    if args.threads:
        set_num_threads(args.threads)
    try:
        rows = evaluate_target(args.target, args.dataset, args.protocol, args.data_root,
                               args.subset, args.test_fraction)
    except (FileNotFoundError, datasets.DataError, checkpoint.CheckpointError,
            ValueError) as exc:
        print(f"adaloss: {exc}", file=sys.stderr)
        return 1
    print(metrics_table(rows))
    if args.json:
        write_json(Path(args.json), {"adaloss_version": __version__,
                                     "command": " ".join(["adaloss"] + sys.argv[1:]),
                                     "runs": [{"name": n, "seed": s, "metrics": m}
                                              for n, s, m in rows]})
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.command == "reproduce":
        return cmd_reproduce(args)
    if args.command == "study":
        return cmd_study(args)
    if args.command == "evaluate":
        return cmd_evaluate(args)
    return cmd_plot(args)


if __name__ == "__main__":
    sys.exit(main())
