"""The benchmarks never overwrite an earlier results file."""
from reference import benchmark_module


def test_a_new_results_file_never_replaces_an_earlier_one(tmp_path):
    io = benchmark_module("results_io")
    first = io.fresh_path(tmp_path, "2026-11-29-host")
    assert first == tmp_path / "2026-11-29-host.json"
    first.write_text("{}")
    second = io.fresh_path(tmp_path, "2026-11-29-host")
    assert second == tmp_path / "2026-11-29-host-2.json"
    second.write_text("{}")
    assert io.fresh_path(tmp_path, "2026-11-29-host") == tmp_path / "2026-11-29-host-3.json"
    assert first.read_text() == "{}" and second.read_text() == "{}"


def test_the_cpu_is_named():
    cpu = benchmark_module("results_io").cpu_model()
    assert isinstance(cpu, str) and cpu.strip()


def test_the_target_bounds_in_the_speed_doc_are_current():
    bounds = benchmark_module("target_bounds")
    bench = bounds.bench_train()
    text = bounds.SPEED_DOC.read_text(encoding="utf-8")
    blocks = list(bounds.BLOCK_RE.finditer(text))
    assert blocks, "docs/speed.md has no bounds block"
    assert bounds.fill(text, bench) == text, \
        "docs/speed.md: a bounds table is stale; run python benchmarks/target_bounds.py --write"
    # a table that differs from its results file is caught
    first = blocks[0]
    stale = text[:first.start("body")] + first["body"].replace("|", "| 1", 1) + text[first.end("body"):]
    assert bounds.fill(stale, bench) != stale


def test_the_target_bounds_follow_the_measured_rates(monkeypatch):
    bounds = benchmark_module("target_bounds")
    bench = bounds.bench_train()
    layers = [("conv", 1, 4), ("pool",), ("linear", 4 * 7 * 7, 10)]
    monkeypatch.setattr(bench, "REPORT_NETS", dict(bench.REPORT_NETS, toy=(1, 14, layers)))
    per_image = bench.flops_per_image(layers, 1, 14, True)
    result = {"sgemm_peak_gflops": {"1": 10.0},
              "configs": [{"net": "toy", "batch": 8, "threads": 1,
                           "torch_train": {"median": 2e9 / per_image},   # 2 GFLOP/s: 20 %
                           "torch_eval": {"median": 1e9},
                           "ours_train": {"median": 4e9 / per_image},
                           "ours_eval": {"median": 1e9}}]}
    (row,) = bounds.rows(result, bench)
    assert abs(row["torch_train"] - 20.0) < 1e-9 and abs(row["ours_train"] - 40.0) < 1e-9
    assert abs(row["need_train_1.8"] - 36.0) < 1e-9 and abs(row["need_train_1.3"] - 26.0) < 1e-9
    assert abs(row["need_eval_2"] - 2 * row["torch_eval"]) < 1e-9
