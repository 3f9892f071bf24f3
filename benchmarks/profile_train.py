#!/usr/bin/env python3
"""Where adaloss's training time goes: a driver for `perf record`.

Trains one of the report's four networks (with its head and Adam, the
settings of bench_train.py) for a fixed wall time at one batch size and
thread count, on random uint8 batches, so that a sampling profiler sees the
training step and little else. It imports neither PyTorch nor the tests'
PyTorch references.

    perf record -e cpu-clock -F 999 -g -o prof.data -- \\
        python benchmarks/profile_train.py --net mnist-arcface --batch 64 --threads 2
    perf report -i prof.data --no-children --sort symbol --stdio

    python benchmarks/profile_train.py --table    # all eight profiles as Markdown

--table runs perf itself for each network and batch and prints the share of
samples per function (self time, top 10), grouped as OpenBLAS kernels or
adaloss functions; it needs `perf` on PATH.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from reference import REPORT_NETS, adaloss_net  # noqa: E402

import adaloss  # noqa: E402

HEADS = {  # the report's settings, as in bench_train.py
    "mnist-arcface": ("arcface", 30.0, 0.5, 1e-3),
    "mnist-adaface": ("adaface", 64.0, 0.4, 1e-3),
    "cifar10-arcface": ("arcface", 10.0, 0.5, 1e-4),
    "cifar10-adaface": ("adaface", 64.0, 0.4, 1e-3),
}


def train(name: str, batch: int, threads: int, seconds: float) -> int:
    """Train `name` for about `seconds` of wall time; returns the steps run."""
    channels, size, layers = REPORT_NETS[name]
    kind, s, m, lr = HEADS[name]
    adaloss.set_num_threads(threads)
    adaloss.manual_seed(0)
    net = adaloss_net(adaloss, layers)
    head = (adaloss.ArcFace(10, 128, s=s, m=m, variant="report") if kind == "arcface"
            else adaloss.AdaFace(10, 128, s=s, m=m, h=0.33, variant="report"))
    trainer = adaloss.Trainer(net, head, adaloss.Adam(net.parameters(), lr=lr))
    rng = np.random.default_rng(1)
    batches = [(rng.integers(0, 256, (batch, channels, size, size), dtype=np.uint8),
                rng.integers(0, 10, batch)) for _ in range(4)]
    steps = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x, y = batches[steps % 4]
        trainer.step(x, y)
        steps += 1
    return steps


def perf_shares(data: Path, top: int) -> tuple[list[tuple[float, str, str]], dict]:
    """(share %, symbol, shared object) of the `top` functions by self time, and
    the shares of OpenMP waiting (libgomp, whose symbols are stripped, summed
    into one row), the kernel and Python, from `perf report`."""
    out = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--stdio",
                          "--sort", "dso,symbol", "-g", "none", "--percent-limit", "0"],
                         capture_output=True, text=True, check=True).stdout
    rows: dict[tuple[str, str], float] = {}
    groups = {"libgomp": 0.0, "kernel": 0.0, "python": 0.0}
    for line in out.splitlines():
        match = re.match(r"\s+([\d.]+)%\s+(\S+)\s+\[([.\w])\]\s+(.+?)\s*$", line)
        if not match:
            continue
        share, dso, kind, sym = float(match.group(1)), match.group(2), match.group(3), match.group(4)
        sym = re.sub(r"\s+-\s+-$", "", sym)  # the empty IPC columns
        if dso.startswith("libgomp"):
            groups["libgomp"] += share
            dso, sym = "libgomp", "(OpenMP barrier and spin wait)"
        elif kind == "k":
            groups["kernel"] += share
            dso, sym = "kernel", "(kernel)"
        elif dso.startswith("libpython") or dso.startswith("python"):
            groups["python"] += share
        if dso.startswith("_core"):
            dso = "adaloss"
        elif "openblas" in dso:
            dso = "OpenBLAS"
        rows[(sym, dso)] = rows.get((sym, dso), 0.0) + share
    ranked = sorted(((v, sym, dso) for (sym, dso), v in rows.items()), reverse=True)
    return ranked[:top], groups


def table(nets: list[str], batches: list[int], threads: int, seconds: float, top: int) -> str:
    lines = [f"Command: `python benchmarks/profile_train.py --table --threads {threads} "
             f"--seconds {seconds:g}` (perf record -e cpu-clock -F 999 -g per network and "
             "batch; self time per function, all threads, whole process).", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for name in nets:
            for batch in batches:
                data = Path(tmp) / f"{name}-{batch}.data"
                res = subprocess.run(
                    ["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-g", "-o", str(data),
                     "--", sys.executable, __file__, "--net", name, "--batch", str(batch),
                     "--threads", str(threads), "--seconds", str(seconds)],
                    capture_output=True, text=True, check=True)
                steps = res.stdout.strip().split()[-1]
                rows, groups = perf_shares(data, top)
                work = 100.0 - groups["libgomp"]
                lines += [f"### {name}, batch {batch}, {threads} threads ({steps} steps)", "",
                          f"OpenMP waiting {groups['libgomp']:.1f} %, kernel "
                          f"{groups['kernel']:.1f} %, Python {groups['python']:.1f} %.", "",
                          "| % of samples | % excluding OpenMP waiting | function | object |",
                          "|---:|---:|---|---|"]
                lines += [f"| {share:.1f} | {'' if dso == 'libgomp' else f'{100 * share / work:.1f}'}"
                          f" | `{sym}` | {dso} |" for share, sym, dso in rows]
                lines.append("")
                print(f"{name} batch {batch} done", file=sys.stderr, flush=True)
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", default="mnist-arcface", choices=list(REPORT_NETS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=8.0, help="wall time of training")
    p.add_argument("--table", action="store_true", help="profile every network at batch 64 "
                   "and 256 under perf and print Markdown tables")
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args()
    if args.batch < 1 or args.threads < 1 or args.seconds <= 0:
        p.error("--batch and --threads must be >= 1 and --seconds > 0")
    if args.table:
        print(table(list(REPORT_NETS), [64, 256], args.threads, args.seconds, args.top))
        return 0
    print("steps", train(args.net, args.batch, args.threads, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
