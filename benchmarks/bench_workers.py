#!/usr/bin/env python3
"""How should a study use the cores: one worker per core with one thread each,
or fewer workers with more threads?

For each network (a `fair` study run: the report's AdaFace backbone with the
published AdaFace head), trains with random batches for a fixed time in
`procs` processes at once, each with `threads` threads, for every layout whose
procs x threads equals the core count (e.g. 2 x 1 and 1 x 2), interleaved,
and reports the total images per second (sum over processes, median over
repeats, min and max) and the ratio of each layout to one process using all
cores. This is what `adaloss study --workers --threads-per-worker` chooses
between; it does not involve PyTorch.

    python benchmarks/bench_workers.py                    # ~5 min on 2 cores
    python benchmarks/bench_workers.py --seconds 10 --repeats 3 --datasets mnist

Writes benchmarks/results/workers-<date>-<host>.json (-2, -3, ... for a later run
of the same day) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import time
from pathlib import Path

from results_io import cpu_model, fresh_path

HERE = Path(__file__).resolve().parent


def _worker(dataset: str, threads: int, seconds: float, batch: int, barrier, results) -> None:
    import numpy as np

    import adaloss
    from adaloss import presets

    adaloss.set_num_threads(threads)
    config = [c for c in presets.runs(dataset, "fair") if c.head == "adaface"][0]
    trainer = presets.build(config, seed=0)
    rng = np.random.default_rng(os.getpid())
    shape = presets.INPUT_SHAPES[dataset]
    x = rng.integers(0, 256, size=(8, batch) + tuple(shape), dtype=np.uint8)
    y = rng.integers(0, config.num_classes, size=(8, batch)).astype(np.int64)
    for i in range(3):                                   # warm-up: buffers, OpenMP pool
        trainer.step(x[i], y[i])
    barrier.wait()                                       # every process starts together
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        trainer.step(x[steps % 8], y[steps % 8])
        steps += 1
    results.put(steps * batch / (time.perf_counter() - t0))


def measure(dataset: str, procs: int, threads: int, seconds: float, batch: int) -> float:
    """Total training images per second of `procs` concurrent processes."""
    ctx = multiprocessing.get_context("spawn")           # OpenMP state does not survive fork
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(dataset, threads, seconds, batch, barrier, results))
               for _ in range(procs)]
    for w in workers:
        w.start()
    rates = [results.get(timeout=600) for _ in workers]
    for w in workers:
        w.join()
        if w.exitcode != 0:
            raise RuntimeError(f"a benchmark worker exited with {w.exitcode}")
    return sum(rates)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="mnist,cifar10")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seconds", type=float, default=20.0, help="timed training per measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    layouts = [(p, args.cores // p) for p in range(args.cores, 0, -1) if args.cores % p == 0]
    rows = []
    for dataset in args.datasets.split(","):
        rates = {layout: [] for layout in layouts}
        for _ in range(args.repeats):                    # interleaved: drift hits every layout
            for procs, threads in layouts:
                rates[(procs, threads)].append(measure(dataset, procs, threads, args.seconds,
                                                       args.batch))
        base = statistics.median(rates[(1, args.cores)])
        for (procs, threads), r in rates.items():
            rows.append({"dataset": dataset, "workers": procs, "threads_per_worker": threads,
                         "img_per_s_median": statistics.median(r), "min": min(r), "max": max(r),
                         "ratio_to_one_worker": statistics.median(r) / base, "all": r})
    print("| network | workers x threads | train img/s, total (min-max) | ratio to 1 worker |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} fair AdaFace | {r['workers']} x {r['threads_per_worker']} | "
              f"{r['img_per_s_median']:.0f} ({r['min']:.0f}-{r['max']:.0f}) | "
              f"{r['ratio_to_one_worker']:.2f} |")
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": socket.gethostname(),
              "cpu": cpu_model(), "cores": args.cores,
              "seconds": args.seconds, "repeats": args.repeats, "batch": args.batch, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = fresh_path(args.out, f"workers-{time.strftime('%Y-%m-%d')}-{socket.gethostname()}")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)                                # never a half-written result
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
