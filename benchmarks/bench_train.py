#!/usr/bin/env python3
"""adaloss vs PyTorch on the same CPU, in one run, interleaved.

For each of the report's four networks with its head: training throughput
(forward, loss, backward, Adam) and evaluation throughput (forward only) at
batch 64 and 256 with 1 and 2 threads, achieved GFLOP/s next to the sgemm
peak measured in the same run, medians over repeats with min and max, and the
ratio adaloss / PyTorch. PyTorch runs each of its CPU paths side by side with
adaloss: eager NCHW, eager channels_last (model and input), and torch.compile
(default mode; its compile time is reported apart and kept out of the
throughput; a compile failure is recorded, not fatal). The ratio that counts
is adaloss against the fastest PyTorch path of each network, batch and thread
count. Optionally peak RSS at batch 256 and one full MNIST epoch of each.

    python benchmarks/bench_train.py                 # everything (~45 min on 2 cores)
    python benchmarks/bench_train.py --quick         # fewer repeats
    python benchmarks/bench_train.py --nets mnist-arcface --batches 64 --threads 2
    python benchmarks/bench_train.py --paths eager,channels_last   # no torch.compile

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
import tempfile
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


TORCH_PATHS = ("eager", "channels_last", "compile")


class TorchPath:
    """One way of running the network in PyTorch: its own copy of the model
    and optimizer, started from the same weights as adaloss."""

    def __init__(self, torch, path: str, layers, state: dict, weight, lr: float, head: tuple):
        self.torch, self.path = torch, path
        self.kind, self.s, self.m = head
        self.net = torch_net(torch, layers)
        self.net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
        self.weight = weight
        if path == "channels_last":
            self.net = self.net.to(memory_format=torch.channels_last)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.loss = self._loss
        self.forward = self.net
        if path == "compile":
            # a fresh start for each network: the compiled code of an earlier
            # one would count against dynamo's recompile limit, past which it
            # silently runs eager
            torch._dynamo.reset()
            self.loss = torch.compile(self._loss)
            self.forward = torch.compile(self.net)

    def _loss(self, xt, y):
        return torch_head_loss(self.torch, self.kind, "report", self.net(xt), self.weight, y,
                               self.s, self.m, h=0.33)

    def convert(self, x):
        # the input conversion is part of the step, as it is in ours
        torch = self.torch
        xt = (torch.from_numpy(x).float() / 255 - 0.5) / 0.5
        if self.path == "channels_last":
            xt = xt.contiguous(memory_format=torch.channels_last)
        return xt

    def train(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        self.loss(self.convert(x), self.torch.from_numpy(y)).backward()
        self.opt.step()

    def eval(self, x):
        with self.torch.no_grad():
            self.forward(self.convert(x))


class Pair:
    """The same network, head and optimizer in adaloss and in PyTorch (one
    model per PyTorch path in `paths`)."""

    def __init__(self, torch, name: str, batch: int, paths=("eager",)):
        channels, size, layers = REPORT_NETS[name]
        kind, s, m, lr = HEADS[name]
        adaloss.manual_seed(0)
        self.net = adaloss_net(adaloss, layers)
        self.head = (adaloss.ArcFace(10, 128, s=s, m=m, variant="report") if kind == "arcface"
                     else adaloss.AdaFace(10, 128, s=s, m=m, h=0.33, variant="report"))
        self.trainer = adaloss.Trainer(self.net, self.head,
                                       adaloss.Adam(self.net.parameters(), lr=lr))
        self.torch = torch
        state = self.net.state_dict()
        weight = torch.from_numpy(self.head.weight.copy())
        self.paths = {p: TorchPath(torch, p, layers, state, weight, lr, (kind, s, m))
                      for p in paths}
        rng = np.random.default_rng(1)
        self.batches = [(rng.integers(0, 256, (batch, channels, size, size), dtype=np.uint8),
                         rng.integers(0, 10, batch)) for _ in range(4)]
        self.flops_train = flops_per_image(layers, channels, size, True) * batch
        self.flops_eval = flops_per_image(layers, channels, size, False) * batch
        self.i = 0

    def next_batch(self):
        batch = self.batches[self.i % 4]
        self.i += 1
        return batch

    def ours_train(self):
        self.trainer.step(*self.next_batch())

    def ours_eval(self):
        self.net.forward(self.next_batch()[0])

    def torch_train(self, path: str = "eager"):
        self.paths[path].train(*self.next_batch())

    def torch_eval(self, path: str = "eager"):
        self.paths[path].eval(self.next_batch()[0])


def timed(fn, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def stats(vals) -> dict:
    return {"median": float(np.median(vals)), "min": float(np.min(vals)),
            "max": float(np.max(vals))}


def measure(pair: Pair, batch: int, repeats: int, steps: int) -> dict:
    """Throughputs of adaloss and of every PyTorch path, interleaved. A path
    whose warm-up fails (torch.compile without a working compiler, say) is
    recorded with its error and left out."""
    timed(pair.ours_train, 2)  # warm-up: plans, allocations
    timed(pair.ours_eval, 2)
    paths, failed, compile_s = [], {}, {}
    for path in pair.paths:
        try:
            # the first call of each compiles under torch.compile: timed apart
            first = {}
            for mode in ("train", "eval"):
                fn = getattr(pair, f"torch_{mode}")
                first[mode] = timed(lambda: fn(path), 1)
                timed(lambda: fn(path), 2)  # oneDNN primitives, recompiles
            paths.append(path)
            if path == "compile":
                compile_s = first
        except Exception as exc:  # noqa: BLE001 - a failed path is a result
            failed[path] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}" \
                if str(exc).strip() else type(exc).__name__
            print(f"  PyTorch path {path} failed: {failed[path]}", flush=True)
    fns = {"ours_train": pair.ours_train, "ours_eval": pair.ours_eval}
    for path in paths:
        fns[f"{path}_train"] = lambda p=path: pair.torch_train(p)
        fns[f"{path}_eval"] = lambda p=path: pair.torch_eval(p)
    out = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved, so drifts in machine load hit all
        for key, fn in fns.items():
            out[key].append(batch / timed(fn, steps))
    res = {"ours_train": stats(out["ours_train"]), "ours_eval": stats(out["ours_eval"]),
           "torch_paths": {}, "torch_failed": failed}
    for path in paths:
        res["torch_paths"][path] = {"train": stats(out[f"{path}_train"]),
                                    "eval": stats(out[f"{path}_eval"])}
    if compile_s:  # the first call's wall time: compilation plus one step
        res["torch_paths"]["compile"]["compile_seconds"] = compile_s
    for mode in ("train", "eval"):
        if not paths:
            res[f"fastest_{mode}"], res[f"ratio_{mode}"] = None, float("nan")
            continue
        best = max(paths, key=lambda p: res["torch_paths"][p][mode]["median"])
        res[f"fastest_{mode}"] = best
        res[f"torch_{mode}"] = res["torch_paths"][best][mode]
        # the ratio that counts: against PyTorch's fastest path
        res[f"ratio_{mode}"] = res[f"ours_{mode}"]["median"] / res[f"torch_{mode}"]["median"]
        if "eager" in paths:
            res[f"ratio_{mode}_eager"] = (res[f"ours_{mode}"]["median"]
                                          / res["torch_paths"]["eager"][mode]["median"])
    res["gflops_train_ours"] = res["ours_train"]["median"] * pair.flops_train / batch / 1e9
    if paths:
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
                pair.paths["eager"].train(x, y)
        res[which] = time.perf_counter() - t0
    res["ratio"] = res["torch"] / res["adaloss"]
    res["torch_path"] = "eager"
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
    p.add_argument("--paths", default=",".join(TORCH_PATHS),
                   help="PyTorch paths to time, comma-separated, from " + ",".join(TORCH_PATHS))
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--epoch", action="store_true", help="also time a full MNIST epoch")
    p.add_argument("--out", default=None)
    p.add_argument("--rss-only", action="store_true", help="only the peak-memory comparison, "
                   "merged into the latest results file of this host")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.steps = 3, 3
    paths = [q for q in args.paths.split(",") if q]
    bad = [q for q in paths if q not in TORCH_PATHS]
    if bad or not paths:
        p.error(f"--paths: expected a comma-separated subset of {','.join(TORCH_PATHS)}, "
                f"got {args.paths!r}")
    # a cache of our own, so compile times are those of a cold start, not of
    # whatever an earlier run left in inductor's default on-disk cache
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench-inductor-"))
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
               "configs": [], "sgemm_peak_gflops": {},
               "torch_paths": paths}
    for threads in map(int, args.threads.split(",")):
        results["sgemm_peak_gflops"][threads] = sgemm_peak(threads, max(3, args.repeats))
        for name in nets:
            for batch in map(int, args.batches.split(",")):
                adaloss.set_num_threads(threads)
                torch.set_num_threads(threads)
                pair = Pair(torch, name, batch, paths)
                res = measure(pair, batch, args.repeats, args.steps)
                res.update(net=name, batch=batch, threads=threads,
                           peak_fraction=res["gflops_train_ours"]
                           / results["sgemm_peak_gflops"][threads])
                results["configs"].append(res)
                print(f"{name} batch {batch} threads {threads}: train {res['ratio_train']:.2f}x "
                      f"(vs {res['fastest_train']}), eval {res['ratio_eval']:.2f}x "
                      f"(vs {res['fastest_eval']}), {res['gflops_train_ours']:.1f} GFLOP/s "
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


def fmt(st: dict | None) -> str:
    return "–" if st is None else f"{st['median']:.0f} ({st['min']:.0f}–{st['max']:.0f})"


def markdown(results: dict) -> str:
    paths = results.get("torch_paths", ["eager"])
    lines = ["| network | batch | threads | adaloss train img/s (min–max) | "
             + " | ".join(f"PyTorch {q} train img/s (min–max)" for q in paths)
             + " | fastest PyTorch (train / eval) | train ratio | eval ratio | adaloss GFLOP/s "
             "| % of sgemm peak |",
             "|---|---|---|---|" + "---|" * len(paths) + "---|---|---|---|---|"]
    compile_lines, failures = [], []
    for r in results["configs"]:
        # results files written before the PyTorch paths held eager only
        tp = r.get("torch_paths", {"eager": {"train": r.get("torch_train"),
                                             "eval": r.get("torch_eval")}})
        cells = " | ".join(fmt(tp[q]["train"]) if q in tp else "failed" for q in paths)
        lines.append(f"| {r['net']} | {r['batch']} | {r['threads']} | {fmt(r['ours_train'])} | "
                     f"{cells} | {r.get('fastest_train', 'eager')} / "
                     f"{r.get('fastest_eval', 'eager')} | {r['ratio_train']:.2f} | "
                     f"{r['ratio_eval']:.2f} | {r['gflops_train_ours']:.1f} | "
                     f"{100 * r['peak_fraction']:.0f} |")
        if "compile" in tp and "compile_seconds" in tp["compile"]:
            c = tp["compile"]["compile_seconds"]
            compile_lines.append(f"{r['net']} batch {r['batch']} threads {r['threads']}: "
                                 f"training {c['train']:.1f} s, evaluation {c['eval']:.1f} s")
        for q, err in r.get("torch_failed", {}).items():
            failures.append(f"{r['net']} batch {r['batch']} threads {r['threads']}, {q}: {err}")
    lines.append("")
    lines.append("Train and eval ratios: adaloss over the fastest PyTorch path of the row.")
    if compile_lines:
        lines.append("")
        lines.append("torch.compile, first call (compilation plus one step), not in the "
                     "throughputs; the run starts with an empty inductor cache, so a later "
                     "configuration may reuse an earlier one's kernels: "
                     + "; ".join(compile_lines))
    if failures:
        lines.append("")
        lines.append("PyTorch paths that failed: " + "; ".join(failures))
    ratios = [r["ratio_train"] for r in results["configs"] if r["batch"] == 64 and r["threads"] == 2]
    if ratios:
        lines.append("")
        lines.append(f"Geometric mean of the training ratios (against the fastest PyTorch path) "
                     f"at batch 64, 2 threads: "
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
