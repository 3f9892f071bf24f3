#!/usr/bin/env python3
"""The whole report, timed: the two `adaloss reproduce --preset report`
commands (MNIST and CIFAR-10, the report's four experiments, evaluation,
metrics and figures included) end to end, and the same four trainings in
PyTorch as the report's scripts ran them (eager, NCHW, batch 64, the same
networks, heads, learning rates and epochs, test accuracy after every
epoch), on the same machine, one after the other.

    python benchmarks/time_report.py --data-root "$ADALOSS_DATA"          # ~2.5 h
    python benchmarks/time_report.py --data-root "$ADALOSS_DATA" \\
        --subset 2000 --epochs 1                                          # a check
    python benchmarks/time_report.py --write        # docs/speed.md's tables

Nothing else may run meanwhile (a run this long cannot be interleaved: say
what else ran). It runs in pieces, each timed on its own: per data set the
adaloss command, then each PyTorch training. Every finished piece is saved at
once in a state file (--state; default benchmarks/results/report-time.partial.json,
not committed) with the load average before and after it, so a stopped run
continues with the next piece when the same command is given again (a piece
cut short is timed again whole). When all are done it prints a Markdown table
and writes the times, the CPU model and the settings to
benchmarks/results/report-time-DATE.json (--json to choose; never
overwritten).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from results_io import SPEED_DOC, cpu_model, fill_blocks, fresh_path, write_doc  # noqa: E402
from bench_train import sgemm_peak  # noqa: E402
from torch_replica import torch_curve  # noqa: E402

import adaloss  # noqa: E402
from adaloss import presets, runs  # noqa: E402
from adaloss.fileio import atomic_write  # noqa: E402


def time_adaloss(dataset: str, args, out: Path) -> tuple:
    """Wall seconds of one `adaloss reproduce --preset report` in a fresh
    process, and each of its runs' own (training and evaluation) by head."""
    cmd = [sys.executable, "-m", "adaloss", "reproduce", "--dataset", dataset, "--preset",
           "report", "--threads", str(args.threads), "--no-progress", "--out", str(out)]
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    if args.subset:
        cmd += ["--subset", str(args.subset)]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    try:
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        records = json.loads((out / "results.json").read_text())["runs"]
        return seconds, {r["head"]: r["wall_seconds"] for r in records}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def torch_data(dataset: str, args):
    data = runs.load_data(dataset, args.data_root)
    if args.subset:   # as reproduce --subset picks
        data = adaloss.datasets.subset(data, args.subset, max(10, args.subset // 5))
    return data


def time_torch(config, data, args) -> float:
    """Wall seconds of one of the report's experiments in PyTorch (data
    loading excluded; adaloss's includes it: a few s)."""
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    torch_curve(torch, config, 0, data, config.epochs)
    return time.perf_counter() - t0


def sgemm_rate(threads: int) -> float:
    """The machine's speed around a piece: sgemm GFLOP/s (2048^3, the median of
    5), as bench_train.py measures its peak. Pieces run hours apart on a
    shared machine; this shows how far its speed moved between them."""
    return sgemm_peak(threads, 5)


def load_state(path: Path, settings: dict) -> dict:
    """The pieces already timed under these settings ({} for a new run)."""
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
        pieces = state["pieces"]
        if not isinstance(pieces, dict) or not all(
                isinstance(p, dict) and isinstance(p.get("seconds"), (int, float))
                for p in pieces.values()):
            raise ValueError("malformed pieces")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--state {path}: not a state file of this script ({e}); "
                         "move it away to start over")
    if state.get("settings") != settings:
        raise SystemExit(f"--state {path}: made with other settings "
                         f"({state.get('settings')}, now {settings}); move it away to "
                         "start over or give another --state")
    return pieces


def save_json(path: Path, obj: dict) -> None:
    """Write whole or not at all."""
    atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode())


def plan(datasets: list, epochs) -> list:
    """The pieces, in the order they run: (key, dataset, RunConfig or None for
    the adaloss command)."""
    out = []
    for d in datasets:
        out.append((f"{d}/adaloss", d, None))
        out += [(f"{d}/torch/{c.head}", d, c) for c in presets.runs(d, "report", epochs)]
    return out


def summary(pieces: dict, datasets: list, epochs=None) -> dict:
    """Per data set the adaloss command's seconds (and its runs' own, where
    recorded: training and evaluation without the command's start, data,
    metrics and figures), each PyTorch training's and their ratio (PyTorch
    over adaloss: above 1, adaloss is faster), None where a piece is not timed
    yet; the totals once every piece is."""
    rows = []
    for dataset in datasets:
        heads = [c.head for c in presets.runs(dataset, "report", epochs)]
        done = {h: pieces[f"{dataset}/torch/{h}"]["seconds"] for h in heads
                if f"{dataset}/torch/{h}" in pieces}
        a = pieces.get(f"{dataset}/adaloss", {}).get("seconds")
        whole = len(done) == len(heads)
        rows.append({"dataset": dataset, "adaloss_seconds": a,
                     "adaloss_runs": pieces.get(f"{dataset}/adaloss", {}).get("runs") or {},
                     "torch_seconds": done,
                     "ratio": sum(done.values()) / a if whole and a else None})
    complete = [r for r in rows if r["ratio"] is not None]
    out = {"rows": rows, "adaloss_total_seconds": None, "torch_total_seconds": None}
    if len(complete) == len(rows):
        out["adaloss_total_seconds"] = sum(r["adaloss_seconds"] for r in rows)
        out["torch_total_seconds"] = sum(sum(r["torch_seconds"].values()) for r in rows)
    return out


def table(result: dict) -> str:
    """The Markdown table of a results file or of a state file (pieces so far)."""
    settings = result.get("settings", result)
    s = summary(result["pieces"], settings["datasets"], settings.get("epochs"))
    lines = ["| data set | adaloss reproduce (s) | PyTorch, the report's scripts (s) | "
             "PyTorch / adaloss |", "|---|---|---|---|"]
    for r in s["rows"]:
        a = "not yet timed" if r["adaloss_seconds"] is None else f"{r['adaloss_seconds']:.0f}"
        if r["adaloss_runs"]:
            a += " (" + ", ".join(f"{h} {sec:.0f}" for h, sec in r["adaloss_runs"].items()) + ")"
        t = ", ".join(f"{h} {sec:.0f}" for h, sec in r["torch_seconds"].items())
        if r["ratio"] is not None:
            t = f"{sum(r['torch_seconds'].values()):.0f} ({t})"
        else:
            t = f"not all timed ({t})" if t else "not yet timed"
        lines.append(f"| {r['dataset']} | {a} | {t} | "
                     + ("—" if r["ratio"] is None else f"{r['ratio']:.2f}") + " |")
    a, t = s["adaloss_total_seconds"], s["torch_total_seconds"]
    if a is not None:
        lines.append(f"| both | {a:.0f} ({a / 60:.1f} min) | {t:.0f} ({t / 60:.1f} min) | "
                     f"{t / a:.2f} |")
    rates = [f"{key} {p['sgemm_gflops_before']:.0f}-{p['sgemm_gflops_after']:.0f}"
             for key, p in result["pieces"].items() if "sgemm_gflops_before" in p]
    if rates:
        lines.append("\nsgemm GFLOP/s before-after each piece (the machine's speed): "
                     + ", ".join(rates)
                     + (" (not measured around the others)"
                        if len(rates) < len(result["pieces"]) else ""))
    return "\n".join(lines)


def fill(text: str, results_dir: Path = HERE / "results") -> str:
    """text with every report-time block remade from the results file it names."""
    return fill_blocks(text, "report-time", table, results_dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default=os.environ.get("ADALOSS_DATA"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--subset", type=int, default=None, metavar="N",
                    help="train on N images (a quick check of the script, not a result)")
    ap.add_argument("--epochs", type=int, default=None, help="default: the report's")
    ap.add_argument("--datasets", default="mnist,cifar10")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--state", type=Path, default=HERE / "results" / "report-time.partial.json",
                    help="where finished pieces are kept between runs")
    ap.add_argument("--max-pieces", type=int, default=None, metavar="N",
                    help="stop after timing N more pieces (the rest at the next run)")
    ap.add_argument("--write", action="store_true",
                    help="remake the report-time tables of docs/speed.md from the results "
                    "files they name, and time nothing")
    args = ap.parse_args(argv)
    if args.write:
        write_doc(SPEED_DOC, fill(SPEED_DOC.read_text(encoding="utf-8")))
        return 0
    datasets = args.datasets.split(",")
    if args.threads < 1:
        ap.error(f"--threads: expected at least 1, got {args.threads}")
    if args.max_pieces is not None and args.max_pieces < 0:
        ap.error(f"--max-pieces: expected a count >= 0, got {args.max_pieces}")
    unknown = [d for d in datasets if d not in ("mnist", "cifar10")]
    if unknown or len(set(datasets)) != len(datasets):
        ap.error(f"--datasets: expected mnist and/or cifar10 once each, got {args.datasets!r}")
    import torch

    settings = {"cpu": cpu_model(), "adaloss": adaloss.__version__, "torch": torch.__version__,
                "threads": args.threads, "subset": args.subset, "epochs": args.epochs,
                "datasets": datasets}
    pieces = load_state(args.state, settings)
    timed = 0
    for key, dataset, config in plan(datasets, args.epochs):
        if key in pieces:
            continue
        if args.max_pieces is not None and timed >= args.max_pieces:
            print(f"stopped after {timed} pieces; the same command continues", file=sys.stderr)
            return 0
        load_before, rate_before = os.getloadavg(), sgemm_rate(args.threads)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        with tempfile.TemporaryDirectory() as tmp:
            piece = {}
            if config is None:
                seconds, piece["runs"] = time_adaloss(dataset, args, Path(tmp) / dataset)
            else:
                seconds = time_torch(config, torch_data(dataset, args), args)
        pieces[key] = {"seconds": seconds, **piece, "started": started,
                       "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                       "sgemm_gflops_before": rate_before,
                       "sgemm_gflops_after": sgemm_rate(args.threads)}
        save_json(args.state, {"settings": settings, "pieces": pieces})
        timed += 1
        print(f"{key}: {seconds:.0f} s", file=sys.stderr, flush=True)

    result = {"created": time.strftime("%Y-%m-%d %H:%M"), **settings,
              **summary(pieces, datasets, args.epochs), "pieces": pieces}
    print(table(result))
    path = args.json or fresh_path(HERE / "results", f"report-time-{time.strftime('%Y-%m-%d')}")
    if args.subset or args.epochs:
        print(f"(a check with --subset/--epochs: not written to {path})", file=sys.stderr)
    else:
        save_json(path, result)
        print(f"wrote {path}", file=sys.stderr)
    args.state.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
