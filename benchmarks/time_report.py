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

Nothing else may run meanwhile (a run this long cannot be interleaved: say
what else ran). Prints a Markdown table and writes the times, the CPU model
and the settings to benchmarks/results/report-time-DATE-HOST.json (--json to
choose; the file is never overwritten).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from results_io import cpu_model, fresh_path  # noqa: E402
from torch_replica import torch_curve  # noqa: E402

import adaloss  # noqa: E402
from adaloss import presets, runs  # noqa: E402


def time_adaloss(dataset: str, args, out: Path) -> float:
    """Wall seconds of one `adaloss reproduce --preset report` in a fresh process."""
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
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def time_torch(dataset: str, args) -> dict:
    """Wall seconds of the report's experiments on `dataset` in PyTorch:
    {head: seconds}, data loading excluded (adaloss's includes it: a few s)."""
    import torch

    torch.set_num_threads(args.threads)
    data = runs.load_data(dataset, args.data_root)
    if args.subset:   # as reproduce --subset picks
        data = adaloss.datasets.subset(data, args.subset, max(10, args.subset // 5))
    out = {}
    for config in presets.runs(dataset, "report", args.epochs):
        t0 = time.perf_counter()
        torch_curve(torch, config, 0, data, config.epochs)
        out[config.head] = time.perf_counter() - t0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default=os.environ.get("ADALOSS_DATA"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--subset", type=int, default=None, metavar="N",
                    help="train on N images (a quick check of the script, not a result)")
    ap.add_argument("--epochs", type=int, default=None, help="default: the report's")
    ap.add_argument("--datasets", default="mnist,cifar10")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    datasets = args.datasets.split(",")
    rows, total_a, total_t = [], 0.0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in datasets:
            a = time_adaloss(dataset, args, Path(tmp) / dataset)
            t = time_torch(dataset, args)
            rows.append({"dataset": dataset, "adaloss_seconds": a, "torch_seconds": t,
                         "ratio": sum(t.values()) / a})
            total_a += a
            total_t += sum(t.values())
            print(f"{dataset}: adaloss {a:.0f} s, PyTorch {sum(t.values()):.0f} s",
                  file=sys.stderr, flush=True)
    print("| data set | adaloss reproduce (s) | PyTorch, the report's scripts (s) | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        torch_s = sum(r["torch_seconds"].values())
        print(f"| {r['dataset']} | {r['adaloss_seconds']:.0f} | {torch_s:.0f} "
              f"({', '.join(f'{h} {s:.0f}' for h, s in r['torch_seconds'].items())}) | "
              f"{r['ratio']:.2f} |")
    print(f"| both | {total_a:.0f} ({total_a / 60:.1f} min) | {total_t:.0f} "
          f"({total_t / 60:.1f} min) | {total_t / total_a:.2f} |")
    import torch

    result = {"created": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model(),
              "adaloss": adaloss.__version__, "torch": torch.__version__,
              "threads": args.threads, "subset": args.subset, "epochs": args.epochs,
              "rows": rows, "adaloss_total_seconds": total_a, "torch_total_seconds": total_t}
    path = args.json or fresh_path(HERE / "results", f"report-time-{time.strftime('%Y-%m-%d')}")
    if args.subset or args.epochs:
        print(f"(a check with --subset/--epochs: not written to {path})", file=sys.stderr)
        return 0
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
