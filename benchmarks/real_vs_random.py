#!/usr/bin/env python3
"""Training steps on the real data set against bench_train.py's random batches.

bench_train.py times training steps on four random uint8 batches; the whole
report's timing (time_report.py) trains on the real images, shuffled. This
script times both in one process, interleaved, for one network: adaloss and
PyTorch eager, each with one model trained on real batches (the replica's
order: a seeded permutation of the training set) and one trained on the
random batches, all four started from the same weights. After the timing it
counts the subnormal floats in each PyTorch model's weights, gradients and
Adam state, and in the activations of one real batch, the usual cause of a
value-dependent slowdown on x86.

    python benchmarks/real_vs_random.py --net mnist-adaface --data-root "$ADALOSS_DATA"
    python benchmarks/real_vs_random.py --net mnist-adaface --flush-denormal ...

--flush-denormal sets torch.set_flush_denormal(True) before any PyTorch work
(so its worker threads start with it). Prints a table; --json writes the
numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_train import HEADS, Pair, TorchPath  # noqa: E402
from reference import REPORT_NETS  # noqa: E402

import adaloss  # noqa: E402
from adaloss import runs  # noqa: E402


def subnormal_share(tensors) -> tuple[int, int]:
    """(subnormal count, total count) over float32 tensors."""
    import torch

    tiny = torch.finfo(torch.float32).tiny
    sub = total = 0
    for t in tensors:
        if t is None:
            continue
        a = t.detach().abs()
        sub += int(((a > 0) & (a < tiny)).sum())
        total += a.numel()
    return sub, total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--net", default="mnist-adaface", choices=sorted(REPORT_NETS))
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="steps per timed burst")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--flush-denormal", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    for name in ("threads", "batch", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected a positive int, got {getattr(args, name)}")

    import torch

    if args.flush_denormal and not torch.set_flush_denormal(True):
        raise SystemExit("--flush-denormal: this CPU does not support it")
    torch.set_num_threads(args.threads)
    adaloss.set_num_threads(args.threads)

    data = runs.load_data(args.net.split("-")[0], args.data_root)
    pair = Pair(torch, args.net, args.batch, paths=("eager",))
    layers = REPORT_NETS[args.net][2]
    kind, s, m, lr = HEADS[args.net]
    # the second PyTorch model and adaloss trainer, from the same weights
    real_torch = TorchPath(torch, "eager", layers, pair.net.state_dict(),
                           torch.from_numpy(pair.head.weight.copy()), lr, (kind, s, m))
    real_trainer = Pair(torch, args.net, args.batch, paths=()).trainer
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data.train_labels))
    cursor = {"i": 0}

    def real_batch():
        n = len(order)
        i = cursor["i"] % (n // args.batch)
        cursor["i"] += 1
        idx = order[i * args.batch:(i + 1) * args.batch]
        return data.train_images[idx], data.train_labels[idx]

    fns = {
        "adaloss/random": pair.ours_train,
        "adaloss/real": lambda: real_trainer.step(*real_batch()),
        "torch/random": pair.torch_train,
        "torch/real": lambda: real_torch.train(*real_batch()),
    }
    for fn in fns.values():          # warm-up: allocations, oneDNN primitives
        for _ in range(3):
            fn()
    rates = {k: [] for k in fns}
    for _ in range(args.repeats):    # interleaved, so drifts in load hit all
        for key, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            rates[key].append(args.batch * args.steps / (time.perf_counter() - t0))

    def state_tensors(tp):
        out = list(tp.net.parameters()) + [p.grad for p in tp.net.parameters()]
        for st in tp.opt.state.values():
            out += [v for v in st.values() if torch.is_tensor(v) and v.is_floating_point()]
        return out

    def activations(tp, x):
        acts = []
        h = tp.convert(x)
        with torch.no_grad():
            for mod in tp.net:
                h = mod(h)
                acts.append(h)
        return acts

    x_real = real_batch()[0]
    result = {"net": args.net, "batch": args.batch, "threads": args.threads,
              "steps": args.steps, "repeats": args.repeats,
              "flush_denormal": args.flush_denormal, "torch": torch.__version__,
              "steps_each": args.steps * args.repeats + 3,
              "images_per_second": {k: float(np.median(v)) for k, v in rates.items()},
              "subnormal": {
                  "torch/random state": subnormal_share(state_tensors(pair.paths["eager"])),
                  "torch/real state": subnormal_share(state_tensors(real_torch)),
                  "torch/real activations": subnormal_share(activations(real_torch, x_real)),
              }}
    ips = result["images_per_second"]
    print(f"{args.net}, batch {args.batch}, {args.threads} threads, "
          f"{args.repeats} x {args.steps} steps each, flush_denormal={args.flush_denormal}\n")
    print("| library | random batches (img/s) | real batches (img/s) | real / random |")
    print("|---|---|---|---|")
    for lib in ("adaloss", "torch"):
        r, q = ips[f"{lib}/random"], ips[f"{lib}/real"]
        print(f"| {lib} | {r:.0f} | {q:.0f} | {q / r:.2f} |")
    print()
    for key, (sub, total) in result["subnormal"].items():
        print(f"{key}: {sub} subnormal of {total} ({100 * sub / max(total, 1):.3g} %)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
