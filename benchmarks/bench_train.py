#!/usr/bin/env python3
"""adaloss vs PyTorch on the same CPU, in one run, interleaved.

For each of the report's four networks with its head: training throughput
(forward, loss, backward, Adam) and evaluation throughput (forward only) at
batch 64 and 256 with 1 and 2 threads, achieved GFLOP/s next to the sgemm
peak measured in the same run, medians over repeats with min and max, and the
ratio adaloss / PyTorch. Optionally peak RSS at batch 256 and one full MNIST
epoch of each.

    python benchmarks/bench_train.py                 # everything (~15 min on 2 cores)
    python benchmarks/bench_train.py --quick         # fewer repeats
    python benchmarks/bench_train.py --nets mnist-arcface --batches 64 --threads 2

Writes benchmarks/results/<date>-<host>.json (-2, -3, ... for a later run of the
same day) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from reference import REPORT_NETS, adaloss_net, torch_head_loss, torch_net  # noqa: E402

import adaloss  # noqa: E402
from results_io import cpu_model, fresh_path  # noqa: E402
from adaloss import _core  # noqa: E402

HEADS = {  # the report's settings
    "mnist-arcface": ("arcface", 30.0, 0.5, 1e-3),
    "mnist-adaface": ("adaface", 64.0, 0.4, 1e-3),
    "cifar10-arcface": ("arcface", 10.0, 0.5, 1e-4),
    "cifar10-adaface": ("adaface", 64.0, 0.4, 1e-3),
}


def flops_per_image(layers, channels, size, train: bool) -> float:
    """Multiply-adds x 2 of every convolution and linear layer; backward counts
    the weight gradient and (except for the first layer) the input gradient."""
    total, h, first = 0.0, size, True
    for spec in layers:
        if spec[0] == "conv":
            f = 2.0 * spec[2] * h * h * spec[1] * 9
            total += f * ((3 if not first else 2) if train else 1)
            first = False
        elif spec[0] == "pool":
            h //= 2
        elif spec[0] == "linear":
            f = 2.0 * spec[1] * spec[2]
            total += f * ((3 if not first else 2) if train else 1)
            first = False
    return total


def sgemm_peak(threads: int, repeats: int) -> float:
    adaloss.set_num_threads(threads)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2048, 2048)).astype(np.float32)
    b = rng.normal(size=(2048, 2048)).astype(np.float32)
    _core.gemm(a, b, 0, 0, 0)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _core.gemm(a, b, 0, 0, 0)
        times.append(time.perf_counter() - t0)
    return 2.0 * 2048 ** 3 / np.median(times) / 1e9


class Pair:
    """The same network, head and optimizer in adaloss and in PyTorch."""

    def __init__(self, torch, name: str, batch: int):
        channels, size, layers = REPORT_NETS[name]
        kind, s, m, lr = HEADS[name]
        adaloss.manual_seed(0)
        self.net = adaloss_net(adaloss, layers)
        self.head = (adaloss.ArcFace(10, 128, s=s, m=m, variant="report") if kind == "arcface"
                     else adaloss.AdaFace(10, 128, s=s, m=m, h=0.33, variant="report"))
        self.trainer = adaloss.Trainer(self.net, self.head,
                                       adaloss.Adam(self.net.parameters(), lr=lr))
        self.torch = torch
        self.tnet = torch_net(torch, layers)
        self.tnet.load_state_dict({k: torch.from_numpy(v) for k, v in self.net.state_dict().items()})
        self.tweight = torch.from_numpy(self.head.weight.copy())
        self.topt = torch.optim.Adam(self.tnet.parameters(), lr=lr)
        self.kind, self.s, self.m = kind, s, m
        rng = np.random.default_rng(1)
        self.batches = [(rng.integers(0, 256, (batch, channels, size, size), dtype=np.uint8),
                         rng.integers(0, 10, batch)) for _ in range(4)]
        self.tbatches = [((torch.from_numpy(x).float() / 255 - 0.5) / 0.5, torch.from_numpy(y))
                         for x, y in self.batches]
        self.flops_train = flops_per_image(layers, channels, size, True) * batch
        self.flops_eval = flops_per_image(layers, channels, size, False) * batch
        self.i = 0

    def ours_train(self):
        x, y = self.batches[self.i % 4]
        self.i += 1
        self.trainer.step(x, y)

    def ours_eval(self):
        self.net.forward(self.batches[self.i % 4][0])
        self.i += 1

    def torch_train(self):
        # the input conversion is part of the step, as it is in ours
        x, y = self.batches[self.i % 4]
        self.i += 1
        torch = self.torch
        xt = (torch.from_numpy(x).float() / 255 - 0.5) / 0.5
        self.topt.zero_grad(set_to_none=True)
        loss = torch_head_loss(torch, self.kind, "report", self.tnet(xt), self.tweight,
                               torch.from_numpy(y), self.s, self.m, h=0.33)
        loss.backward()
        self.topt.step()

    def torch_eval(self):
        torch = self.torch
        x = self.batches[self.i % 4][0]
        self.i += 1
        with torch.no_grad():
            self.tnet((torch.from_numpy(x).float() / 255 - 0.5) / 0.5)


def timed(fn, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def measure(pair: Pair, batch: int, repeats: int, steps: int) -> dict:
    for fn in (pair.ours_train, pair.torch_train, pair.ours_eval, pair.torch_eval):
        timed(fn, 2)  # warm-up: plans, allocations, oneDNN primitives
    out = {k: [] for k in ("ours_train", "torch_train", "ours_eval", "torch_eval")}
    for _ in range(repeats):  # interleaved, so drifts in machine load hit both
        for key in out:
            out[key].append(batch / timed(getattr(pair, key), steps))
    res = {}
    for key, vals in out.items():
        res[key] = {"median": float(np.median(vals)), "min": float(np.min(vals)),
                    "max": float(np.max(vals))}
    res["ratio_train"] = res["ours_train"]["median"] / res["torch_train"]["median"]
    res["ratio_eval"] = res["ours_eval"]["median"] / res["torch_eval"]["median"]
    res["gflops_train_ours"] = res["ours_train"]["median"] * pair.flops_train / batch / 1e9
    res["gflops_train_torch"] = res["torch_train"]["median"] * pair.flops_train / batch / 1e9
    return res


RSS_SCRIPT = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[3])
from reference import REPORT_NETS, adaloss_net, torch_head_loss, torch_net


def hwm_mib():  # VmHWM is per address space, fresh after exec (ru_maxrss is not)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024


name, which = sys.argv[1], sys.argv[2]
channels, size, layers = REPORT_NETS[name]
rng = np.random.default_rng(1)
x = rng.integers(0, 256, (256, channels, size, size), dtype=np.uint8)
y = rng.integers(0, 10, 256)
if which == "adaloss":
    import adaloss
    adaloss.set_num_threads(2)
    net = adaloss_net(adaloss, layers)
    head = adaloss.ArcFace(10, 128, variant="report")
    trainer = adaloss.Trainer(net, head, adaloss.Adam(net.parameters()))
    before = hwm_mib()
    for _ in range(5):
        trainer.step(x, y)
else:
    import torch
    torch.set_num_threads(2)
    tnet = torch_net(torch, layers)
    weight = torch.randn(10, 128) * 0.1
    opt = torch.optim.Adam(tnet.parameters())
    before = hwm_mib()
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        xt = (torch.from_numpy(x).float() / 255 - 0.5) / 0.5
        torch_head_loss(torch, "arcface", "report", tnet(xt), weight, torch.from_numpy(y),
                        10.0, 0.5).backward()
        opt.step()
print(before, hwm_mib())
"""


def peak_rss(name: str, which: str) -> dict:
    """Peak RSS (MiB, VmHWM) of a fresh process that imports one library, builds
    the network and trains 5 steps at batch 256; and the part the training
    added over the imports and the model."""
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, name, which,
                          str(HERE.parent / "tests")], capture_output=True, text=True, check=True)
    before, peak = map(float, out.stdout.split()[-2:])
    return {"peak": peak, "training": peak - before}


def mnist_epoch(torch, threads: int) -> dict:
    """Wall time of one full MNIST epoch (60,000 images, shuffled, uint8 in
    memory) for the report's MNIST ArcFace network in each library."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import data_root

    root = data_root()
    data = adaloss.datasets.load_mnist(root)
    adaloss.set_num_threads(threads)
    torch.set_num_threads(threads)
    pair = Pair(torch, "mnist-arcface", 64)
    order = np.random.default_rng(0).permutation(60000)
    res = {}
    for which in ("adaloss", "torch"):
        t0 = time.perf_counter()
        for i in range(0, 60000, 64):
            idx = order[i:i + 64]
            x, y = data.train_images[idx], data.train_labels[idx]
            if which == "adaloss":
                pair.trainer.step(x, y)
            else:
                pair.batches[0] = (x, y)
                pair.i = 0
                pair.torch_train()
        res[which] = time.perf_counter() - t0
    res["ratio"] = res["torch"] / res["adaloss"]
    return res


def results_path(new: bool) -> Path:
    """benchmarks/results/<date>-<host>.json. A new run never overwrites an
    earlier one of the same day (-2, -3, ... are added); --rss-only merges into
    the newest of the day."""
    stem = f"{time.strftime('%Y-%m-%d')}-{socket.gethostname()}"
    folder = HERE / "results"
    if new:
        return fresh_path(folder, stem)
    runs = sorted(folder.glob(f"{stem}*.json"), key=lambda q: q.stat().st_mtime)
    return runs[-1] if runs else folder / f"{stem}.json"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", default=",".join(REPORT_NETS))
    p.add_argument("--batches", default="64,256")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
    p.add_argument("--quick", action="store_true", help="3 repeats of 3 steps")
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--epoch", action="store_true", help="also time a full MNIST epoch")
    p.add_argument("--out", default=None)
    p.add_argument("--rss-only", action="store_true", help="only the peak-memory comparison, "
                   "merged into the latest results file of this host")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.steps = 3, 3
    import torch

    nets = args.nets.split(",")
    if args.rss_only:
        out = Path(args.out or results_path(new=False))
        results = json.loads(out.read_text())
        results["peak_rss_mib_batch256"] = {
            name: {"adaloss": peak_rss(name, "adaloss"), "torch": peak_rss(name, "torch")}
            for name in nets}
        results["table"] = markdown(results)
        out.write_text(json.dumps(results, indent=1))
        print(results["table"])
        return 0
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": socket.gethostname(),
               "cpu": cpu_model(), "adaloss": adaloss.__version__,
               "torch": torch.__version__, "repeats": args.repeats, "steps": args.steps,
               "configs": [], "sgemm_peak_gflops": {}}
    for threads in map(int, args.threads.split(",")):
        results["sgemm_peak_gflops"][threads] = sgemm_peak(threads, max(3, args.repeats))
        for name in nets:
            for batch in map(int, args.batches.split(",")):
                adaloss.set_num_threads(threads)
                torch.set_num_threads(threads)
                pair = Pair(torch, name, batch)
                res = measure(pair, batch, args.repeats, args.steps)
                res.update(net=name, batch=batch, threads=threads,
                           peak_fraction=res["gflops_train_ours"]
                           / results["sgemm_peak_gflops"][threads])
                results["configs"].append(res)
                print(f"{name} batch {batch} threads {threads}: train {res['ratio_train']:.2f}x, "
                      f"eval {res['ratio_eval']:.2f}x, {res['gflops_train_ours']:.1f} GFLOP/s "
                      f"({100 * res['peak_fraction']:.0f} % of sgemm)", flush=True)
    if not args.no_rss:
        results["peak_rss_mib_batch256"] = {
            name: {"adaloss": peak_rss(name, "adaloss"), "torch": peak_rss(name, "torch")}
            for name in nets}
    if args.epoch:
        results["mnist_epoch_seconds"] = mnist_epoch(torch, 2)
    table = markdown(results)
    results["table"] = table
    out = Path(args.out or results_path(new=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out)
    print(table)
    print(f"wrote {out}")
    return 0


def markdown(results: dict) -> str:
    lines = ["| network | batch | threads | adaloss train img/s (min–max) | PyTorch train img/s "
             "(min–max) | train ratio | eval ratio | adaloss GFLOP/s | % of sgemm peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["configs"]:
        o, t = r["ours_train"], r["torch_train"]
        lines.append(f"| {r['net']} | {r['batch']} | {r['threads']} | {o['median']:.0f} "
                     f"({o['min']:.0f}–{o['max']:.0f}) | {t['median']:.0f} ({t['min']:.0f}–"
                     f"{t['max']:.0f}) | {r['ratio_train']:.2f} | {r['ratio_eval']:.2f} | "
                     f"{r['gflops_train_ours']:.1f} | {100 * r['peak_fraction']:.0f} |")
    ratios = [r["ratio_train"] for r in results["configs"] if r["batch"] == 64 and r["threads"] == 2]
    if ratios:
        lines.append("")
        lines.append(f"Geometric mean of the training ratios at batch 64, 2 threads: "
                     f"{float(np.exp(np.mean(np.log(ratios)))):.2f}x")
    lines.append("sgemm peak (2048^3, GFLOP/s): " + ", ".join(
        f"{k} thread{'s' if int(k) > 1 else ''}: {v:.1f}"
        for k, v in results["sgemm_peak_gflops"].items()))
    if "peak_rss_mib_batch256" in results:
        lines.append("")
        lines.append("Peak RSS at batch 256, 2 threads, 5 training steps, each library alone in a "
                     "fresh process (MiB; in brackets what training added over imports and model):")
        lines.append("")
        lines.append("| network | adaloss | PyTorch |")
        lines.append("|---|---|---|")
        for name, v in results["peak_rss_mib_batch256"].items():
            a, t = v["adaloss"], v["torch"]
            lines.append(f"| {name} | {a['peak']:.0f} (+{a['training']:.0f}) | "
                         f"{t['peak']:.0f} (+{t['training']:.0f}) |")
    if "mnist_epoch_seconds" in results:
        e = results["mnist_epoch_seconds"]
        lines.append("")
        lines.append(f"One MNIST epoch (60,000 images, report ArcFace net, batch 64, 2 threads): "
                     f"adaloss {e['adaloss']:.1f} s, PyTorch {e['torch']:.1f} s "
                     f"({e['ratio']:.2f}x)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
