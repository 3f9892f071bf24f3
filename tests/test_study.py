"""A tiny study end to end: parallel workers, resume after an interruption,
the same summary; the statistics; a Dask LocalCluster."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import adaloss
from adaloss import study


def test_wilcoxon_and_t():
    # exact small-sample values (scipy.stats.wilcoxon, two-sided, exact)
    assert study.wilcoxon_signed_rank([1, 2, 3, 4, 5]) == pytest.approx(0.0625)
    assert study.wilcoxon_signed_rank([1, -2, 3, -4, 5]) == pytest.approx(0.8125)
    assert study.wilcoxon_signed_rank([0, 0]) == 1.0
    assert study.t_quantile_975(4) == 2.776 and study.t_quantile_975(100) == 1.96
    # ties get average ranks and the exact distribution over all 32 sign patterns
    # (|d| ranks 2, 2, 2, 4, 5; W- = 2: 8 of 32 patterns are as extreme)
    assert study.wilcoxon_signed_rank([1, 1, -1, 2, 3]) == pytest.approx(8 / 32)
    assert study.wilcoxon_signed_rank([0, 1, 1, -1, 2, 3]) == pytest.approx(8 / 32)  # zero dropped
    with pytest.raises(ValueError, match="df"):
        study.t_quantile_975(0)


def test_statistics_without_scipy_say_how_to_install_it(monkeypatch):
    from adaloss import stats

    monkeypatch.setitem(sys.modules, "scipy.stats", None)    # import scipy.stats fails
    monkeypatch.setitem(sys.modules, "scipy", None)
    with pytest.raises(ImportError, match=re.escape('pip install "adaloss[study]"')):
        stats.wilcoxon_signed_rank([1, 2, 3])
    assert stats.ci_or_none([1.0, 2.0]) == (1.0, 2.0)         # needs no SciPy


def test_ci_or_none_reads_memory_and_json_alike(tmp_path):
    # one seed: NaN in memory, null in summary.json; both mean "no CI"
    assert study.ci_or_none([math.nan, math.nan]) is None
    assert study.ci_or_none([None, None]) is None
    assert study.ci_or_none(None) is None
    assert study.ci_or_none([0.5, math.inf]) is None
    assert study.ci_or_none([-0.12, 0.14]) == (-0.12, 0.14)
    (tmp_path / "runs").mkdir()
    for head, acc in (("arcface", 0.990), ("adaface", 0.991)):
        (tmp_path / "runs" / f"{head}.json").write_text(json.dumps(
            {"dataset": "mnist", "preset": "fair", "head": head, "seed": 0, "test_accuracy": acc,
             "test_accuracy_plain": acc, "wall_seconds": 1.0}))
    one = study.summarize(tmp_path)
    assert study.ci_or_none(one["cells"][0]["ci95"]) is None
    assert "–" in one["table"]
    # records already read by the caller are the ones summarised
    records = study._read_runs(tmp_path)
    assert len(records) == 2
    again = study.summarize(tmp_path, records=records)
    assert again["table"] == one["table"] and again["runs"] == 2   # (a CI of NaN != NaN)
    assert study.summarize(tmp_path, records=records[:1])["runs"] == 1


def test_plan_goes_seed_by_seed():
    tasks = study.plan(["mnist", "cifar10"], ["report", "paper", "fair"],
                       {"mnist": 5, "cifar10": 3})
    assert len(tasks) == 5 * 8 + 3 * 8 and len({t[0] for t in tasks}) == len(tasks)
    first = tasks[:8]     # seed 0 of every MNIST cell before any seed 1
    assert {t[2] for t in first} == {0} and all(t[1].dataset == "mnist" for t in first)
    assert {(t[1].preset, t[1].head) for t in first} == {
        ("report", "arcface"), ("report", "adaface"), ("paper", "arcface"), ("paper", "adaface"),
        ("fair", "softmax"), ("fair", "cosface"), ("fair", "arcface"), ("fair", "adaface")}
    assert [t[2] for t in tasks[:40]] == sorted(t[2] for t in tasks[:40])


def test_plan_keeps_only_the_asked_heads():
    tasks = study.plan(["mnist"], ["fair", "report"], {"mnist": 2}, heads=["arcface", "adaface"])
    assert [t[0] for t in tasks] == [
        "mnist-fair-arcface-seed0", "mnist-fair-adaface-seed0",
        "mnist-report-arcface-seed0", "mnist-report-adaface-seed0",
        "mnist-fair-arcface-seed1", "mnist-fair-adaface-seed1",
        "mnist-report-arcface-seed1", "mnist-report-adaface-seed1"]
    for bad in (["arcfce"], [], ["softmax", "nope"]):
        with pytest.raises(ValueError, match="heads"):
            study.plan(["mnist"], ["fair"], {"mnist": 1}, heads=bad)


def test_plan_names_the_bad_argument():
    for args, name in (((["mnst"], ["fair"], {"mnst": 1}), "datasets"),
                       (([], ["fair"], {}), "datasets"),
                       ((["mnist"], ["fiar"], {"mnist": 1}), "presets"),
                       ((["mnist"], ["fair"], {"cifar10": 1}), "seeds"),
                       ((["mnist"], ["fair"], {"mnist": 0}), "seeds"),
                       ((["mnist"], ["fair"], {"mnist": 2.5}), "seeds")):
        with pytest.raises(ValueError, match=name):
            study.plan(*args)


@pytest.mark.slow
def test_a_failed_run_keeps_the_others(tmp_path, shared_data, capsys):
    # CIFAR-10 is missing from this data root: its runs fail, MNIST's are kept
    root = tmp_path / "data"
    root.mkdir()
    (root / "mnist").symlink_to(shared_data / "mnist", target_is_directory=True)
    with pytest.raises(study.RunsFailed) as err:
        study.study(datasets=["mnist", "cifar10"], presets=["report"], seeds=1, epochs=1,
                    subset=128, data_root=root, workers=2, out=tmp_path / "s", progress=False)
    failed = err.value.failures
    assert sorted(failed) == ["cifar10-report-adaface-seed0", "cifar10-report-arcface-seed0"]
    assert all(isinstance(e, adaloss.datasets.DataError) for e in failed.values())
    assert "2 run(s) failed" in str(err.value) and "CIFAR-10 is not in" in str(err.value)
    runs = sorted(p.name for p in (tmp_path / "s" / "runs").iterdir())
    assert runs == ["mnist-report-adaface-seed0.json", "mnist-report-arcface-seed0.json"]
    assert err.value.summary["runs"] == 2 and err.value.summary["runs_planned"] == 4
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["runs"] == 2
    # the CLI retries only the failed runs, prints the summary and exits 1
    code = adaloss.cli.main(["study", "--datasets", "mnist,cifar10", "--presets", "report",
                             "--seeds", "1", "--epochs", "1", "--subset", "128",
                             "--workers", "1", "--data-root", str(root),
                             "--out", str(tmp_path / "s")])
    out, errtext = capsys.readouterr()
    assert code == 1 and "2 already done, 2 to run now" in out and "| mnist | report |" in out
    assert errtext.startswith("adaloss: 2 run(s) failed") and "Traceback" not in errtext


@pytest.mark.slow
def test_tiny_study_resumes_to_the_same_summary(tmp_path, shared_data):
    kwargs = dict(datasets=["mnist"], presets=["fair"], seeds=2, epochs=1, subset=256,
                  data_root=shared_data, workers=2, progress=False)
    straight = study.study(out=tmp_path / "a", **kwargs)
    assert straight["runs"] == 8 and len(straight["cells"]) == 4
    # interrupted after 3 runs, then resumed
    partial = study.study(out=tmp_path / "b", max_runs=3, **kwargs)
    assert partial["runs"] == 3 and partial["runs_planned"] == 8
    assert "Unfinished grid: 3 of 8 runs" in (tmp_path / "b" / "summary.md").read_text()
    # max_runs=0 runs nothing and only summarises what is there
    assert study.study(out=tmp_path / "b", max_runs=0, **kwargs)["runs"] == 3
    resumed = study.study(out=tmp_path / "b", **kwargs)
    assert resumed["runs"] == 8
    for a, b in zip(straight["cells"], resumed["cells"]):
        assert a["accuracies"] == b["accuracies"] and a["head"] == b["head"]
    assert [p["mean_diff"] for p in straight["pairs"]] == [p["mean_diff"] for p in resumed["pairs"]]
    assert len(straight["pairs"]) == 6                 # 4 heads, all pairs, seeds shared
    cell = straight["cells"][0]
    assert cell["n"] == 2 and cell["ci95"][0] <= cell["mean"] <= cell["ci95"][1]
    run = json.loads(next((tmp_path / "a" / "runs").glob("*.json")).read_text())
    assert run["history"]["epochs"] == [1] and run["subset"] == 256
    text = (tmp_path / "a" / "summary.md").read_text()
    assert text.startswith("| data set |") and "Unfinished" not in text
    assert (f"Made by adaloss {adaloss.__version__} on " in text and "with `adaloss study "
            "--datasets mnist --presets fair --seeds mnist=2 --epochs 1 --subset 256`." in text)
    assert straight["cpu_hours"] > 0
    # strict JSON (no NaN), per-seed differences kept, the three figures written
    saved = json.loads((tmp_path / "a" / "summary.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"summary.json holds {c}"))
    pair = saved["pairs"][0]
    acc = {c["head"]: dict(zip(c["seeds"], c["accuracies"])) for c in saved["cells"]}
    assert pair["seeds"] == [0, 1] and pair["diffs"] == pytest.approx(
        [acc[pair["a"]][s] - acc[pair["b"]][s] for s in (0, 1)])
    for name in ("accuracy.png", "pairs.png", "curves.png"):
        assert (tmp_path / "a" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every run finished: no per-epoch checkpoints left behind
    assert not (tmp_path / "a" / "runs" / study.PARTIAL).exists()
    assert not (tmp_path / "b" / "runs" / study.PARTIAL).exists()


@pytest.mark.slow
def test_identical_cells_are_trained_once(tmp_path, shared_data, capsys):
    # the paper and fair AdaFace runs are the same network, head, optimizer and seed
    kwargs = dict(datasets=["mnist"], presets=["paper", "fair"], heads=["adaface"], seeds=1,
                  epochs=1, subset=128, data_root=shared_data, workers=1, out=tmp_path)
    summary = study.study(**kwargs)
    assert "2 runs, 0 already done, 1 to run now" in capsys.readouterr().out
    runs = tmp_path / "runs"
    paper = json.loads((runs / "mnist-paper-adaface-seed0.json").read_text())
    fair = json.loads((runs / "mnist-fair-adaface-seed0.json").read_text())
    assert "same_run_as" not in paper and fair["same_run_as"] == "mnist-paper-adaface-seed0"
    assert fair["preset"] == fair["config"]["preset"] == "fair" and fair["name"] == "mnist-fair-adaface"
    for field in ("history", "test_accuracy", "theta_hist", "sample_predictions", "wall_seconds"):
        assert fair[field] == paper[field]
    assert summary["runs"] == 2
    assert summary["cpu_hours"] == pytest.approx(paper["wall_seconds"] / 3600)   # counted once
    # a resume copies a missing twin from the finished run without training
    (runs / "mnist-fair-adaface-seed0.json").unlink()
    study.study(max_runs=0, **kwargs)
    assert "(1 of them copied from an identical run), 0 to run now" in capsys.readouterr().out
    assert json.loads((runs / "mnist-fair-adaface-seed0.json").read_text())["history"] == \
        paper["history"]


@pytest.mark.slow
def test_study_on_a_dask_local_cluster(tmp_path, shared_data):
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        summary = study.study(datasets=["mnist"], presets=["report"], seeds=1, epochs=1,
                              subset=128, data_root=shared_data, out=tmp_path / "d",
                              scheduler=cluster.scheduler_address, progress=False)
    assert summary["runs"] == 2
    assert all(0 <= c["mean"] <= 100 for c in summary["cells"])
    # one seed per cell: no CI, stored as null rather than NaN
    saved = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert all(c["ci95"] == [None, None] for c in saved["cells"])


# The CLI in a child process with Python's Ctrl-C handler (a background job's
# SIGINT may start out ignored, which would make these tests pass vacuously).
CHILD = """
import signal, sys
if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from adaloss import cli
    sys.exit(cli.main(sys.argv[1:]))
"""


def _start_study(tmp_path, shared_data, presets, seeds, subset):
    script = tmp_path / "run_study.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), "study", "--datasets", "mnist", "--presets", presets,
         "--seeds", str(seeds), "--epochs", "2", "--subset", str(subset), "--workers", "2",
         "--data-root", str(shared_data), "--out", str(tmp_path / "s")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().startswith("study: ")
    return proc


def _workers(pid: int, cpu_seconds: float, timeout: float = 120) -> list:
    """The study's worker processes, once each has used `cpu_seconds` (is training)."""
    tick = os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmd = (stat.parent / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == pid and b"spawn_main" in cmd:
                found[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / tick
        if len(found) == 2 and min(found.values()) >= cpu_seconds:
            return sorted(found)
        time.sleep(0.2)
    pytest.fail(f"the study's two workers did not start training within {timeout} s")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_ctrl_c_stops_the_study_at_once(tmp_path, shared_data):
    # 20 runs of about 10 s each on 2 workers: finishing the queue would take
    # minutes; Ctrl-C must end the study (and its workers) within seconds
    proc = _start_study(tmp_path, shared_data, "report,paper", 5, subset=6000)
    workers = _workers(proc.pid, cpu_seconds=2)
    os.kill(proc.pid, signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the study kept running for 30 s after Ctrl-C")
    assert proc.returncode == 130, err
    assert "study interrupted" in err and "Traceback" not in err
    assert not any(Path(f"/proc/{w}").exists() for w in workers)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_run_interrupted_in_its_worker_is_not_kept(tmp_path, shared_data):
    # Ctrl-C reaching one worker only: its run stops early and must not be
    # recorded as finished; the other runs carry on
    proc = _start_study(tmp_path, shared_data, "report", 2, subset=3000)
    victim = _workers(proc.pid, cpu_seconds=2.5)[0]    # start-up and data take < 1 s
    os.kill(victim, signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err
    # on a loaded machine the signal can still land in the worker's start-up
    # (imports, data), before training: then no epoch count is known
    assert "1 run(s) failed" in err and re.search(r"interrupted( after [01] of 2 epochs)?; not kept",
                                                  err)
    kept = sorted(p.stem for p in (tmp_path / "s" / "runs").glob("*.json"))
    assert len(kept) == 3 and err.split("- ")[1].split(":")[0] not in kept
    for name in kept:
        record = json.loads((tmp_path / "s" / "runs" / f"{name}.json").read_text())
        assert not record["history"]["interrupted"] and record["history"]["epochs"] == [1, 2]


def _arcface(epochs: int, preset: str = "fair"):
    from adaloss import presets
    return next(c for c in presets.runs("mnist", preset, epochs) if c.head == "arcface")


def test_a_run_resumes_from_its_checkpoint_to_the_same_record(tmp_path, shared_data):
    from adaloss import runs
    data = study._load("mnist", shared_data, 256)
    kw = dict(progress=False, evaluate=False)      # the embedding metrics: in the study test
    straight = runs.run_one(_arcface(2, "report"), 0, data, **kw)
    folder = tmp_path / "partial"
    first = runs.run_one(_arcface(1, "report"), 0, data, checkpoint_dir=folder, **kw)
    assert (folder / "latest.ckpt").exists() and "resumed_after_epoch" not in first
    resumed = runs.run_one(_arcface(2, "report"), 0, data, checkpoint_dir=folder, **kw)
    assert resumed["resumed_after_epoch"] == 1 and "resumed_after_epoch" not in straight
    for key, values in straight["history"].items():
        if key != "seconds":
            assert resumed["history"][key] == values, key
    for key in ("test_accuracy", "test_accuracy_plain", "theta_hist", "theta_mean_deg",
                "quality_hist", "sample_predictions"):
        assert resumed[key] == straight[key], key
    # the earlier process's time up to its epoch is counted (training, evaluation, saving)
    elapsed = json.loads((folder / runs.ELAPSED).read_text())
    assert elapsed["epoch"] == 2 and elapsed["wall_seconds"] <= resumed["wall_seconds"]
    assert resumed["wall_seconds"] > first["wall_seconds"] > first["history"]["seconds"][0]
    # a checkpoint already at the last epoch: nothing left to train, the same record
    again = runs.run_one(_arcface(2, "report"), 0, data, checkpoint_dir=folder, **kw)
    assert again["resumed_after_epoch"] == 2 and again["test_accuracy"] == straight["test_accuracy"]
    with pytest.raises(ValueError, match="checkpoint_dir: cannot be combined"):
        runs.run_one(_arcface(1), 0, data, progress=False, checkpoint_dir=folder,
                     metrics_every_epoch=True)


@pytest.mark.slow
def test_a_partial_run_of_other_settings_or_damaged_starts_over(tmp_path, shared_data, capsys):
    config = _arcface(1).to_dict()
    folder = tmp_path / "runs" / study.PARTIAL / "mnist-fair-arcface-seed0"
    args = (config, 0, str(shared_data), 256, 1)
    # a checkpoint at epoch 1 of these settings
    first = study.run_task(*args, checkpoint_dir=str(folder))
    assert "resumed_after_epoch" not in first
    longer = dict(config, epochs=2)
    assert study.run_task(longer, 0, str(shared_data), 256, 1,
                          checkpoint_dir=str(folder))["resumed_after_epoch"] == 1
    # another seed's checkpoint (settings.json differs): discarded, trained from the start
    other = study.run_task(longer, 1, str(shared_data), 256, 1, checkpoint_dir=str(folder))
    assert "resumed_after_epoch" not in other and other["history"]["epochs"] == [1, 2]
    assert json.loads((folder / "settings.json").read_text())["seed"] == 1
    assert "discarded its checkpoint (made with other settings)" in capsys.readouterr().err
    # a damaged checkpoint of the right settings: discarded, trained from the start
    (folder / "latest.ckpt").write_bytes(b"not a checkpoint")
    fresh = study.run_task(longer, 1, str(shared_data), 256, 1, checkpoint_dir=str(folder))
    assert "resumed_after_epoch" not in fresh and fresh["test_accuracy"] == other["test_accuracy"]
    assert fresh["metrics"] == other["metrics"]
    assert "discarded its checkpoint (" in capsys.readouterr().err
    # a checkpoint that is a folder (damaged by hand): discarded, not a failure at every start
    (folder / "latest.ckpt").unlink()
    (folder / "latest.ckpt").mkdir()
    again = study.run_task(longer, 1, str(shared_data), 256, 1, checkpoint_dir=str(folder))
    assert "resumed_after_epoch" not in again and again["test_accuracy"] == other["test_accuracy"]
    assert "discarded its checkpoint (its latest.ckpt is not a file)" in capsys.readouterr().err
    # a checkpoint beyond the epochs asked for: discarded, the shorter run trained
    short = study.run_task(config, 1, str(shared_data), 256, 1, checkpoint_dir=str(folder))
    assert short["history"]["epochs"] == [1] and "resumed_after_epoch" not in short
    assert "beyond the 1 asked for" in capsys.readouterr().err


def test_checkpoints_of_finished_runs_are_removed(tmp_path):
    runs_dir = tmp_path / "runs"
    (runs_dir / study.PARTIAL / "a-seed0").mkdir(parents=True)
    (runs_dir / study.PARTIAL / "b-seed0").mkdir(parents=True)
    (runs_dir / "a-seed0.json").write_text("{}")
    study._drop_finished_partials(runs_dir, progress=False)
    assert sorted(p.name for p in (runs_dir / study.PARTIAL).iterdir()) == ["b-seed0"]
