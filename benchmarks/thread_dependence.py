#!/usr/bin/env python3
"""Which results depend on the thread count: one forward and backward of
single layers (the shapes of the report's networks) and of the four report
networks with their heads, run with 1 and with 2 threads in fresh processes,
compared by SHA-256 of every output and gradient.

    python benchmarks/thread_dependence.py          # about a minute

Prints a Markdown table: for each case and array, "same" or "differs".
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

LAYERS = {  # name: (layers, input shape per example)
    "linear 3136->128": ([("flatten",), ("linear", 3136, 128)], (64, 7, 7)),
    "linear 12544->256": ([("flatten",), ("linear", 12544, 256)], (64, 14, 14)),
    "conv 1->32 @28 (2 images per GEMM)": ([("conv", 1, 32)], (1, 28, 28)),
    "conv 32->64 @14 (8 images per GEMM; 6 before 2026-12-01)": ([("conv", 32, 64)], (32, 14, 14)),
    "conv 128->256 @8 (16 images per GEMM)": ([("conv", 128, 256)], (128, 8, 8)),
}


def sha(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:12]


def digests(threads: int, batch: int) -> dict:
    """{case: {array: sha}} for one thread count, in this process."""
    import adaloss
    from profile_train import HEADS
    from reference import REPORT_NETS, adaloss_net

    adaloss.set_num_threads(threads)
    out = {}
    for name, (layers, shape) in LAYERS.items():
        adaloss.manual_seed(0)
        net = adaloss_net(adaloss, layers, shape)
        rng = np.random.default_rng(1)
        x = rng.normal(size=(batch, *shape)).astype(np.float32)
        y = net.forward(x)
        dy = rng.normal(size=y.shape).astype(np.float32)
        net.zero_grad()
        dx = net.backward(dy)
        out[name] = {"output": sha(y), "input grad": sha(dx),
                     **{f"{p.name} grad": sha(p.grad) for p in net.parameters()}}
    for name, (channels, size, layers) in REPORT_NETS.items():
        kind, s, m, _ = HEADS[name]
        adaloss.manual_seed(0)
        net = adaloss_net(adaloss, layers)
        head = (adaloss.ArcFace(10, 128, s=s, m=m, variant="report") if kind == "arcface"
                else adaloss.AdaFace(10, 128, s=s, m=m, h=0.33, variant="report"))
        rng = np.random.default_rng(1)
        x = rng.integers(0, 256, (batch, channels, size, size), dtype=np.uint8)
        labels = rng.integers(0, 10, batch)
        emb = net.forward(x)
        head.forward(emb, labels)
        d_emb = head.backward()
        net.zero_grad()
        net.backward(d_emb)
        out[name] = {"embedding": sha(emb), "head weight grad": sha(head.weight_grad),
                     **{f"{p.name} grad": sha(p.grad) for p in net.parameters()}}
    return out


def main() -> int:
    if len(sys.argv) == 3:  # the child: one thread count
        print(json.dumps(digests(int(sys.argv[1]), int(sys.argv[2]))))
        return 0
    lines = ["| case | batch | same with 1 and 2 threads | differs |", "|---|---|---|---|"]
    for batch in (64, 256):
        runs = [json.loads(subprocess.run([sys.executable, __file__, str(t), str(batch)],
                                          capture_output=True, text=True, check=True).stdout)
                for t in (1, 2)]
        for case, arrays in runs[0].items():
            same = [k for k in arrays if runs[1][case][k] == arrays[k]]
            differ = [k for k in arrays if runs[1][case][k] != arrays[k]]
            lines.append(f"| {case} | {batch} | {', '.join(same) or '–'} | "
                         f"{', '.join(differ) or '–'} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
