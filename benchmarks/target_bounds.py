#!/usr/bin/env python3
"""What the speed targets would take: for every row of a bench_train.py
result, the share of the same run's sgemm peak that PyTorch's fastest path
reached, and the share adaloss would need to be 1.3x or 1.8x faster in
training and 2x faster in evaluation.

    python benchmarks/target_bounds.py [RESULTS_JSON]        # print the table
    python benchmarks/target_bounds.py --write               # docs/speed.md's tables

The rates count the convolution and linear FLOPs bench_train.py counts
(forward; backward: weight gradient and, but for the first layer, input
gradient) over the measured time. An im2col + GEMM implementation cannot
pass 100 % of the peak by much (its GEMMs run at most at the peak, and
everything else only adds time), so a target that needs more than that is
out of its reach on that machine whatever is tuned: it takes an algorithm
with fewer multiplications. A second table gives the report's four trainings
(epochs of training and test-set evaluation) at adaloss's measured rates and
at 100 % of the peak: the least wall time such a core needs for the report.
`--write` puts the tables between the ``<!-- bounds:FILE -->`` and
``<!-- /bounds -->`` (``report-bound``) lines of docs/speed.md, FILE naming
the results file.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_io import SPEED_DOC, block_re, fill_blocks, write_doc  # noqa: E402

from adaloss.presets import EPOCHS  # noqa: E402
from adaloss.study import TRAIN_SIZES  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BLOCK_RE = block_re("bounds")


def bench_train():
    """bench_train.py as a module: its networks (REPORT_NETS) and its FLOP
    count (flops_per_image), so the two scripts count alike."""
    here = str(ROOT / "benchmarks")
    sys.path.insert(0, here)
    try:
        import bench_train as module
    finally:
        sys.path.remove(here)          # bench_train puts tests/ in front of it
    return module


def rows(result: dict, bench) -> list:
    out = []
    peaks = result["sgemm_peak_gflops"]
    for c in result["configs"]:
        channels, size, layers = bench.REPORT_NETS[c["net"]]
        if str(c["threads"]) not in peaks:
            raise ValueError(f"the results hold no sgemm peak for {c['threads']} threads "
                             f"(they have {sorted(peaks)})")
        peak = peaks[str(c["threads"])]
        ft = bench.flops_per_image(layers, channels, size, True)
        fe = bench.flops_per_image(layers, channels, size, False)

        def share(images_per_second: float, flops: float) -> float:
            return 100.0 * images_per_second * flops / 1e9 / peak

        torch_train = share(c["torch_train"]["median"], ft)
        torch_eval = share(c["torch_eval"]["median"], fe)
        out.append({
            "net": c["net"], "batch": c["batch"], "threads": c["threads"],
            "torch_train": torch_train, "torch_eval": torch_eval,
            "ours_train": share(c["ours_train"]["median"], ft),
            "ours_eval": share(c["ours_eval"]["median"], fe),
            "need_train_1.3": 1.3 * torch_train, "need_train_1.8": 1.8 * torch_train,
            "need_eval_2": 2.0 * torch_eval,
        })
    return out


def table(result: dict, bench) -> str:
    lines = ["| network | batch | threads | PyTorch's fastest, train / eval (% of peak) "
             "| adaloss, train / eval | train 1.3x needs | train 1.8x needs | eval 2x needs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows(result, bench):
        lines.append(f"| {r['net']} | {r['batch']} | {r['threads']} | "
                     f"{r['torch_train']:.0f} / {r['torch_eval']:.0f} | "
                     f"{r['ours_train']:.0f} / {r['ours_eval']:.0f} | "
                     f"{r['need_train_1.3']:.0f} | {r['need_train_1.8']:.0f} | "
                     f"{r['need_eval_2']:.0f} |")
    return "\n".join(lines)


# The report's trainings: (network, training images, test images, epochs).
REPORT_RUNS = [(f"{d}-{head}", TRAIN_SIZES[d], 10000, EPOCHS[d])
               for d in ("mnist", "cifar10") for head in ("arcface", "adaface")]


def report_rows(result: dict, bench, batch: int = 64, threads: int = 2) -> list:
    """The report's four trainings (every epoch: the training set, then the
    test set's forward pass) in seconds, at the rates adaloss reached in
    `result` and at 100 % of its sgemm peak; processes, data, metrics and
    figures not counted. A bound on the whole report's wall time: an im2col
    + GEMM core needs at least the at-peak time."""
    peak = result["sgemm_peak_gflops"][str(threads)]
    rates = {c["net"]: c for c in result["configs"]
             if c["batch"] == batch and c["threads"] == threads}
    out = []
    for net, n_train, n_test, epochs in REPORT_RUNS:
        if net not in rates:
            raise ValueError(f"the results hold no {net} row at batch {batch}, "
                             f"{threads} threads")
        channels, size, layers = bench.REPORT_NETS[net]
        ft = bench.flops_per_image(layers, channels, size, True)
        fe = bench.flops_per_image(layers, channels, size, False)
        c = rates[net]
        out.append({"net": net, "epochs": epochs,
                    "measured": epochs * (n_train / c["ours_train"]["median"]
                                          + n_test / c["ours_eval"]["median"]),
                    "at_peak": epochs * (n_train * ft + n_test * fe) / 1e9 / peak})
    return out


def report_table(result: dict, bench) -> str:
    rows = report_rows(result, bench)
    lines = ["| training (batch 64, 2 threads) | epochs | at adaloss's measured rates (s) "
             "| at 100 % of the sgemm peak (s) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['net']} | {r['epochs']} | {r['measured']:.0f} | {r['at_peak']:.0f} |")
    m, p = sum(r["measured"] for r in rows), sum(r["at_peak"] for r in rows)
    lines.append(f"| all four | | {m:.0f} ({m / 60:.1f} min) | {p:.0f} ({p / 60:.1f} min) |")
    return "\n".join(lines)


def latest_result() -> Path:
    """The newest bench_train.py result (by name: date, then -2, -3, ...)."""
    def key(p: Path):
        m = re.fullmatch(r"(\d{4}-\d{2}-\d{2})-(.+?)(?:-(\d+))?", p.stem)
        return (m[1], int(m[3] or 1)) if m else ("", 0)
    files = [p for p in RESULTS.glob("*.json")
             if re.match(r"\d{4}-\d{2}-\d{2}-", p.name) and "configs" in json.loads(p.read_text())]
    if not files:
        raise SystemExit(f"no bench_train.py results in {RESULTS}")
    return max(files, key=key)


def fill(text: str, bench, results_dir: Path = RESULTS) -> str:
    """text with every bounds and report-bound block recomputed from the
    results file it names."""
    text = fill_blocks(text, "bounds", lambda result: table(result, bench), results_dir)
    return fill_blocks(text, "report-bound", lambda result: report_table(result, bench),
                       results_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", type=Path, default=None,
                        help="a bench_train.py results file (default: the newest)")
    parser.add_argument("--write", action="store_true",
                        help="recompute the bounds blocks of docs/speed.md in place")
    args = parser.parse_args(argv)
    bench = bench_train()
    if args.write:
        if args.results is not None:
            parser.error("--write recomputes the tables from the results files docs/speed.md "
                         "names; give no RESULTS_JSON with it")
        write_doc(SPEED_DOC, fill(SPEED_DOC.read_text(encoding="utf-8"), bench))
        return 0
    path = args.results or latest_result()
    print(f"{path.name}:\n")
    result = json.loads(path.read_text())
    print(table(result, bench))
    print("\nThe report's trainings at these rates and at the peak:\n")
    print(report_table(result, bench))
    return 0


if __name__ == "__main__":
    sys.exit(main())
