#!/usr/bin/env python3
"""Training-step (or forward) time of two builds of adaloss, interleaved: how
much a change to the C core costs or gains.

    python benchmarks/ab_step.py OLD_TREE NEW_TREE [--threads 1,2] [--batch 64]
                                 [--repeats 9] [--steps 8] [--nets NAME,...]
                                 [--mode train|eval] [--new-env KEY=VALUE ...]

OLD_TREE and NEW_TREE are source trees with the extension built in place
(`python setup.py build_ext --inplace`). For each network, thread count and
repeat, one fresh process per build times `--steps` training steps after two
warm-up steps, on the same random uint8 batches; the order of the two builds
alternates between repeats. Prints a Markdown table of the paired ratio
new / old (median and interquartile range over the repeats; above 1: the new
build is slower). `--mode eval` times the network's forward pass instead of
the training step. `--new-env KEY=VALUE` sets an environment variable for the
new side only, so one tree can be compared with itself under another setting:

    python benchmarks/ab_step.py . . --new-env ADALOSS_CONV=winograd

Pause other work on the machine while it runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

CHILD = r'''
import json, sys, time
import numpy as np
import adaloss
from adaloss import presets
name, threads, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
mode = sys.argv[5]
adaloss.set_num_threads(threads)
config = {c.name: c for d in presets.DATASETS for p in presets.PRESETS
          for c in presets.runs(d, p)}[name]
trainer = presets.build(config, seed=0)
rng = np.random.default_rng(0)
shape = presets.INPUT_SHAPES[config.dataset]
x = rng.integers(0, 256, (batch, *shape), dtype=np.uint8)
y = rng.integers(0, 10, batch)
run = (lambda: trainer.step(x, y)) if mode == "train" else (lambda: trainer.net.forward(x))
for _ in range(2):
    run()
times = []
for _ in range(steps):
    t = time.perf_counter()
    run()
    times.append(time.perf_counter() - t)
print(json.dumps({"seconds": float(np.median(times))}))
'''

DEFAULT_NETS = ("mnist-report-arcface", "mnist-report-adaface", "cifar10-report-arcface",
                "cifar10-report-adaface", "cifar10-fair-arcface")


def step_seconds(tree: str, name: str, threads: int, batch: int, steps: int, mode: str = "train",
                 extra_env: dict | None = None) -> float:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree), "OMP_NUM_THREADS": str(threads)}
    env.update(extra_env or {})
    proc = subprocess.run([sys.executable, "-c", CHILD, name, str(threads), str(batch),
                           str(steps), mode], capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir(), timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: {name} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.splitlines()[-1])["seconds"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--nets", default=",".join(DEFAULT_NETS))
    parser.add_argument("--mode", choices=("train", "eval"), default="train")
    parser.add_argument("--new-env", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    new_env = {}
    for item in args.new_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--new-env: expected KEY=VALUE, got {item!r}")
        new_env[key] = value
    for tree in (args.old, args.new):
        if not os.path.isdir(os.path.join(tree, "adaloss")):
            parser.error(f"{tree}: expected a source tree holding adaloss/")
    threads = [int(t) for t in args.threads.split(",")]
    print(f"| network | threads | old {args.mode} (ms) | new / old, median | IQR |")
    print("|---|---|---|---|---|")
    for name in args.nets.split(","):
        for t in threads:
            ratios, olds = [], []
            for r in range(args.repeats):
                order = ("old", "new") if r % 2 == 0 else ("new", "old")
                got = {side: step_seconds(args.old if side == "old" else args.new, name, t,
                                          args.batch, args.steps, args.mode,
                                          new_env if side == "new" else None)
                       for side in order}
                ratios.append(got["new"] / got["old"])
                olds.append(got["old"])
            q1, med, q3 = np.percentile(ratios, [25, 50, 75])
            print(f"| {name} | {t} | {1e3 * np.median(olds):.1f} | {med:.3f} | "
                  f"{q1:.3f}-{q3:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
