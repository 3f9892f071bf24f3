"""The benchmarks' results: never overwritten, their generated doc tables current, the report timing resumable."""
import json

import pytest

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
    assert "<!-- report-bound:" in text, "docs/speed.md has no report-bound block"
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


def _fake_timings(monkeypatch, report, calls):
    """time_report with its timers replaced: each piece takes 10 s (adaloss) or
    20 s (a PyTorch training) and is recorded in calls."""
    def fake_adaloss(dataset, args, out):
        calls.append(f"{dataset}/adaloss")
        return 10.0, {"arcface": 3.0, "adaface": 6.0}

    def fake_torch(config, data, args):
        calls.append(f"{config.dataset}/torch/{config.head}")
        return 20.0

    monkeypatch.setattr(report, "time_adaloss", fake_adaloss)
    monkeypatch.setattr(report, "time_torch", fake_torch)
    monkeypatch.setattr(report, "torch_data", lambda dataset, args: None)
    rates = iter(range(100, 200))
    monkeypatch.setattr(report, "sgemm_rate", lambda threads: float(next(rates)))


def test_the_report_timing_continues_where_it_stopped(tmp_path, monkeypatch):
    report = benchmark_module("time_report")
    calls = []
    _fake_timings(monkeypatch, report, calls)
    state, out = tmp_path / "state.json", tmp_path / "result.json"
    argv = ["--data-root", str(tmp_path), "--state", str(state), "--json", str(out)]
    assert report.main(argv + ["--max-pieces", "2"]) == 0
    assert calls == ["mnist/adaloss", "mnist/torch/arcface"]
    assert state.exists() and not out.exists()
    assert report.main(argv) == 0        # the same command: the four pieces left
    assert calls[2:] == ["mnist/torch/adaface", "cifar10/adaloss", "cifar10/torch/arcface",
                         "cifar10/torch/adaface"]
    assert not state.exists()
    result = json.loads(out.read_text())
    assert [r["dataset"] for r in result["rows"]] == ["mnist", "cifar10"]
    assert all(r["adaloss_seconds"] == 10.0 and r["ratio"] == 4.0 for r in result["rows"])
    assert result["adaloss_total_seconds"] == 20.0 and result["torch_total_seconds"] == 80.0
    assert len(result["pieces"]) == 6 and result["threads"] == 2
    assert result["pieces"]["cifar10/adaloss"]["runs"] == {"arcface": 3.0, "adaface": 6.0}
    table = report.table(result)
    assert "| both | 20 (0.3 min) | 80 (1.3 min) | 4.00 |" in table
    assert "| mnist | 10 (arcface 3, adaface 6) | 40 (arcface 20, adaface 20) | 4.00 |" in table
    # the machine's speed before and after each piece, in the order they ran
    assert [(p["sgemm_gflops_before"], p["sgemm_gflops_after"])
            for p in result["pieces"].values()] == [(100 + 2 * i, 101 + 2 * i) for i in range(6)]
    assert "mnist/adaloss 100-101, mnist/torch/arcface 102-103" in table
    assert "not measured" not in table


def test_the_report_timing_refuses_a_state_of_other_settings_or_damaged(tmp_path, monkeypatch):
    report = benchmark_module("time_report")
    calls = []
    _fake_timings(monkeypatch, report, calls)
    state = tmp_path / "state.json"
    argv = ["--data-root", str(tmp_path), "--state", str(state), "--json",
            str(tmp_path / "r.json")]
    assert report.main(argv + ["--max-pieces", "1"]) == 0
    with pytest.raises(SystemExit, match=r"--state .*state\.json: made with other settings"):
        report.main(argv + ["--threads", "1"])
    for damaged in ["{", '{"settings": {}}', '{"settings": {}, "pieces": {"a": {"seconds": "x"}}}']:
        state.write_text(damaged)
        with pytest.raises(SystemExit, match=r"--state .*state\.json: not a state file"):
            report.main(argv)
    assert calls == ["mnist/adaloss"]


def test_the_report_time_tables_follow_their_results(tmp_path):
    report = benchmark_module("time_report")
    text = report.SPEED_DOC.read_text(encoding="utf-8")
    assert report.fill(text) == text, \
        "docs/speed.md: a report-time table is stale; run python benchmarks/time_report.py --write"
    def piece(seconds):
        return {"seconds": seconds, "started": "2026-12-01 15:00:00"}

    result = {"datasets": ["mnist"], "epochs": None,
              "pieces": {"mnist/adaloss": piece(100.0), "mnist/torch/arcface": piece(60.0),
                         "mnist/torch/adaface": piece(90.0)}}
    (tmp_path / "report-time-x.json").write_text(json.dumps(result))
    doc = "a\n<!-- report-time:report-time-x.json -->\nold\n<!-- /report-time -->\nb\n"
    new = report.fill(doc, tmp_path)
    assert "| mnist | 100 | 150 (arcface 60, adaface 90) | 1.50 |" in new
    assert "| both | 100 (1.7 min) | 150 (2.5 min) | 1.50 |" in new
    assert new.startswith("a\n<!-- report-time:report-time-x.json -->\n| data set")
    assert new.endswith("|\n<!-- /report-time -->\nb\n") and report.fill(new, tmp_path) == new
    with pytest.raises(SystemExit, match="names report-time-y.json"):
        report.fill(doc.replace("-x.json", "-y.json"), tmp_path)
    # a state file, pieces still to time: their cells say so, no ratio, no totals
    state = {"settings": {"datasets": ["mnist", "cifar10"], "epochs": None},
             "pieces": {"mnist/adaloss": piece(100.0), "mnist/torch/arcface": piece(60.0),
                        "cifar10/adaloss": piece(400.0)}}
    lines = report.table(state).splitlines()
    assert lines[2:] == ["| mnist | 100 | not all timed (arcface 60) | — |",
                         "| cifar10 | 400 | not yet timed | — |"]


@pytest.mark.parametrize("bad, message", [(["--threads", "0"], "--threads: expected at least 1"),
                                          (["--max-pieces", "-1"], "--max-pieces: expected"),
                                          (["--datasets", "mnist,svhn"], "--datasets: expected"),
                                          (["--datasets", "mnist,mnist"], "--datasets: expected")])
def test_the_report_timing_names_a_bad_argument(tmp_path, monkeypatch, capsys, bad, message):
    report = benchmark_module("time_report")
    calls = []
    _fake_timings(monkeypatch, report, calls)
    with pytest.raises(SystemExit):
        report.main(["--state", str(tmp_path / "s.json")] + bad)
    assert message in capsys.readouterr().err and calls == []
    assert not (tmp_path / "s.json").exists()


def test_the_report_bound_counts_every_epochs_training_and_evaluation(monkeypatch):
    bounds = benchmark_module("target_bounds")
    bench = bounds.bench_train()
    layers = [("conv", 1, 4), ("pool",), ("linear", 4 * 7 * 7, 10)]
    monkeypatch.setattr(bench, "REPORT_NETS", dict(bench.REPORT_NETS, toy=(1, 14, layers)))
    monkeypatch.setattr(bounds, "REPORT_RUNS", [("toy", 1000, 100, 3)])
    ft, fe = bench.flops_per_image(layers, 1, 14, True), bench.flops_per_image(layers, 1, 14, False)
    result = {"sgemm_peak_gflops": {"2": 10.0},
              "configs": [{"net": "toy", "batch": 64, "threads": 2,
                           "ours_train": {"median": 500.0}, "ours_eval": {"median": 1000.0}},
                          {"net": "toy", "batch": 256, "threads": 2,     # not the report's batch
                           "ours_train": {"median": 1.0}, "ours_eval": {"median": 1.0}}]}
    (row,) = bounds.report_rows(result, bench)
    assert abs(row["measured"] - 3 * (1000 / 500 + 100 / 1000)) < 1e-9
    assert abs(row["at_peak"] - 3 * (1000 * ft + 100 * fe) / 1e10) < 1e-12
    assert "| all four | | 6 (0.1 min) |" in bounds.report_table(result, bench)
    result["configs"] = result["configs"][1:]
    with pytest.raises(ValueError, match="no toy row at batch 64, 2 threads"):
        bounds.report_rows(result, bench)


@pytest.mark.parametrize("flag", ["--steps", "--repeats", "--threads", "--batch"])
def test_real_vs_random_names_a_bad_count(flag, capsys):
    script = benchmark_module("real_vs_random")
    with pytest.raises(SystemExit):
        script.main([flag, "0"])
    assert f"{flag}: expected a positive int, got 0" in capsys.readouterr().err
