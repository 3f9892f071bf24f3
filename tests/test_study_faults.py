"""The study and the command line under faults and misuse: signals and killed
processes, stale or bad run records, two studies on one folder, a full disk,
bad arguments."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import adaloss
from adaloss import _core, cli, presets, study

LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def fake_record(config, seed: int, subset=None, threads: int = 1, acc: float = 0.9) -> dict:
    """A run record as a study writes it, without training."""
    history = {"epochs": [1], "train_loss": [1.0], "test_accuracy": [acc],
               "test_accuracy_plain": [acc], "seconds": [1.0], "interrupted": False,
               "skipped_steps": 0}
    return {"name": config.name, "head": config.head, "seed": seed, "config": config.to_dict(),
            "history": history, "test_accuracy": acc, "test_accuracy_plain": acc,
            "wall_seconds": 1.0, "theta_hist": None, "theta_mean_deg": 40.0,
            "quality_hist": None, "sample_indices": [], "sample_predictions": [],
            "dataset": config.dataset, "preset": config.preset, "threads": threads,
            "subset": subset, "adaloss_version": adaloss.__version__}


GRID = dict(datasets=["mnist"], presets=["fair"], seeds=1, epochs=1, subset=200)


def write_grid(out: Path, seeds: int = 1, subset=200, epochs=1) -> list:
    """Fake records for every run of the mnist fair grid; their paths."""
    (out / "runs").mkdir(parents=True, exist_ok=True)
    paths = []
    for rid, config, seed in study.plan(["mnist"], ["fair"], {"mnist": seeds}, epochs):
        path = out / "runs" / f"{rid}.json"
        path.write_text(json.dumps(fake_record(config, seed, subset, acc=0.9 - 0.01 * seed)))
        paths.append(path)
    return paths


# ---------------------------------------------------------------- records


@pytest.mark.slow
def test_a_record_made_with_other_settings_is_refused_naming_file_and_settings(tmp_path,
                                                                               shared_data):
    out = tmp_path / "s"
    base = ["study", "--datasets", "mnist", "--presets", "fair", "--heads", "softmax",
            "--seeds", "1", "--workers", "1", "--data-root", str(shared_data), "--out", str(out)]
    run = subprocess.run([sys.executable, "-m", "adaloss", *base, "--subset", "200",
                          "--epochs", "1"], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    record_path = out / "runs" / "mnist-fair-softmax-seed0.json"
    before = record_path.read_bytes()
    summary_before = (out / "summary.json").read_bytes()
    # the same grid at other settings: the old record must not count as done
    run = subprocess.run([sys.executable, "-m", "adaloss", *base, "--subset", "300",
                          "--epochs", "2"], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "already done" not in run.stdout and "Traceback" not in run.stderr
    assert "mnist-fair-softmax-seed0.json" in run.stderr and str(out / "runs") in run.stderr
    assert "subset 200 in the record, 300 now" in run.stderr
    assert "config.epochs 1 in the record, 2 now" in run.stderr
    assert "--out" in run.stderr and "--rerun-mismatched" in run.stderr
    assert record_path.read_bytes() == before                      # nothing changed
    assert (out / "summary.json").read_bytes() == summary_before
    # --rerun-mismatched trains it again and keeps the old record aside
    run = subprocess.run([sys.executable, "-m", "adaloss", *base, "--subset", "300",
                          "--epochs", "2", "--rerun-mismatched"], capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "0 already done, 1 to run now" in run.stdout and "moved to" in run.stderr
    record = json.loads(record_path.read_text())
    assert record["subset"] == 300 and record["history"]["epochs"] == [1, 2]
    assert (out / "runs" / ".mismatched" / record_path.name).read_bytes() == before
    assert json.loads((out / "summary.json").read_text())["runs"] == 1


def test_every_setting_of_a_record_is_matched(tmp_path):
    write_grid(tmp_path, subset=200)
    assert study.study(out=tmp_path, max_runs=0, progress=False, **GRID)["runs"] == 4
    for change, needle in ((dict(subset=300), "subset 200"), (dict(epochs=3), "config.epochs 1"),
                           (dict(threads_per_worker=2), "threads 1")):
        with pytest.raises(study.RecordsMismatch, match=needle) as err:
            study.study(out=tmp_path, max_runs=0, progress=False, **{**GRID, **change})
        assert len(err.value.mismatches) == 4
    # lr, head arguments, layers, batch size, version: any key of the record
    path = tmp_path / "runs" / "mnist-fair-arcface-seed0.json"
    good = json.loads(path.read_text())
    for key, value in (("lr", 0.5), ("head_kwargs", {"s": 32.0, "m": 0.5, "variant": "paper"}),
                       ("layers", [["flatten"]]), ("batch_size", 128)):
        path.write_text(json.dumps(dict(good, config=dict(good["config"], **{key: value}))))
        with pytest.raises(study.RecordsMismatch, match=f"config.{key}") as err:
            study.study(out=tmp_path, max_runs=0, progress=False, **GRID)
        assert list(err.value.mismatches) == [path]
    path.write_text(json.dumps(dict(good, adaloss_version="0.0.9")))
    with pytest.raises(study.RecordsMismatch, match="adaloss_version"):
        study.study(out=tmp_path, max_runs=0, progress=False, **GRID)
    # a setting this version does not know (a newer record) never matches
    path.write_text(json.dumps(dict(good, config=dict(good["config"], protocol="open"))))
    with pytest.raises(study.RecordsMismatch, match=r"config.protocol \"open\" in the record, "
                                                    r"\(missing\) now"):
        study.study(out=tmp_path, max_runs=0, progress=False, **GRID)


def test_a_field_missing_from_an_old_record_matches_its_legacy_default(tmp_path, monkeypatch):
    paths = write_grid(tmp_path, subset=200)
    for path in paths:
        record = json.loads(path.read_text())
        del record["threads"]
        path.write_text(json.dumps(record))
    with pytest.raises(study.RecordsMismatch, match=r"threads \(missing\) in the record, 1 now"):
        study.study(out=tmp_path, max_runs=0, progress=False, **GRID)
    monkeypatch.setitem(study.LEGACY_DEFAULTS, "threads", 1)
    assert study.study(out=tmp_path, max_runs=0, progress=False, **GRID)["runs"] == 4
    with pytest.raises(study.RecordsMismatch, match=r"threads \(missing, taken as 1\) in the record, 2 now"):
        study.study(out=tmp_path, max_runs=0, progress=False, threads_per_worker=2, **GRID)


def test_committed_records_still_match_the_command_that_made_them(tmp_path):
    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "study"
    out = tmp_path / "study"
    shutil.copytree(committed, out)
    summary = study.study(datasets=["mnist", "cifar10"], presets=["report", "paper", "fair"],
                          seeds={"mnist": 5, "cifar10": 3}, max_runs=0, out=out,
                          progress=False)
    expected = json.loads((committed / "summary.json").read_text())
    saved = json.loads((out / "summary.json").read_text())
    # the grid, and the remedy runs committed beside it
    assert summary["runs_planned"] == 64
    assert summary["runs"] == len(list((committed / "runs").glob("*.json"))) >= 64
    expected.pop("created"), saved.pop("created")
    assert saved == expected


def test_bad_record_files_are_named_and_moved_aside(tmp_path, capsys):
    paths = write_grid(tmp_path, subset=200)
    good_text = paths[0].read_text()
    good = json.loads(good_text)
    paths[0].write_text(good_text[:200])                          # truncated
    paths[1].write_text(json.dumps(dict(json.loads(paths[1].read_text()),
                                        test_accuracy="0.5")))               # mistyped
    paths[2].write_text(json.dumps(["not", "a", "record"]))                  # foreign
    paths[3].write_text(json.dumps(good))                                    # another run's
    summary = study.study(out=tmp_path, max_runs=0, progress=True, **GRID)
    err = capsys.readouterr()
    assert summary["runs"] == 0 and summary["runs_planned"] == 4
    assert "study: 4 runs, 0 already done" in err.out
    for path, why in zip(paths, ("not a readable JSON file", "field 'test_accuracy'",
                                 "expected a JSON object", "holds run mnist-fair-softmax-seed0")):
        assert f"{path} is not a valid run record" in err.err and why in err.err
        assert not path.exists() and (tmp_path / "runs" / ".bad" / path.name).exists()
    # the next study starts clean and a bad file moved again does not overwrite the first
    paths[0].write_text("{")
    study.study(out=tmp_path, max_runs=0, progress=False, **GRID)
    bad = tmp_path / "runs" / ".bad"
    assert (bad / "mnist-fair-softmax-seed0.1.json").read_text() == "{"
    assert (bad / "mnist-fair-softmax-seed0.json").read_text() == good_text[:200]
    # summarize alone refuses a bad file by name instead of a bare conversion error
    paths[1].write_text(json.dumps(dict(good, test_accuracy="0.5" * 100)))
    with pytest.raises(ValueError, match=f"{paths[1].name}.*test_accuracy"):
        study.summarize(tmp_path)


# ---------------------------------------------------------------- the folder lock

HOLD = """
import sys, time
from pathlib import Path
from adaloss import study
with study._folder_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_study_on_a_folder_is_refused_until_the_first_ends(tmp_path, capsys):
    write_grid(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
                              cwd=tmp_path)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(study.FolderBusy, match=f"{tmp_path} is in use by another study "
                                                   f"\\(process {holder.pid}"):
            study.study(out=tmp_path, max_runs=0, progress=False, **GRID)
        assert not (tmp_path / "summary.json").exists()
        code = cli.main(["study", "--datasets", "mnist", "--presets", "fair", "--seeds", "1",
                         "--epochs", "1", "--subset", "200", "--max-runs", "0",
                         "--out", str(tmp_path)])
        assert code == 1 and f"process {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()           # SIGKILL: the lock is released by the system
        holder.wait()
    assert study.study(out=tmp_path, max_runs=0, progress=False, **GRID)["runs"] == 4


# ---------------------------------------------------------------- summary on a full disk


@pytest.fixture
def small_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs (a full disk)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: Path, leave: int) -> None:
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))


def test_a_full_disk_leaves_the_previous_summary_and_figures(small_tmpfs):
    out = small_tmpfs / "s"
    write_grid(out, seeds=1)
    study.study(out=out, max_runs=0, progress=False, **GRID)
    names = ("summary.json", "summary.md", "accuracy.png", "pairs.png", "curves.png")
    before = {n: (out / n).read_bytes() for n in names}
    write_grid(out, seeds=2)                            # a second seed: a new summary
    # room for the summary's text, not for its figures
    _fill(small_tmpfs, leave=2 * (len(before["summary.json"]) + len(before["summary.md"])) + 8192)
    with pytest.raises(OSError, match=f"could not write the summary of {out}.*previous summary"):
        study.study(out=out, max_runs=0, progress=False, **{**GRID, "seeds": 2})
    assert {n: (out / n).read_bytes() for n in names} == before
    assert not [p.name for p in out.iterdir() if p.name.endswith((".new", ".new.png", ".tmp"))]
    (small_tmpfs / "filler").unlink()
    summary = study.study(out=out, max_runs=0, progress=False, **{**GRID, "seeds": 2})
    assert summary["runs"] == 8 and json.loads((out / "summary.json").read_text())["runs"] == 8
    assert all((out / n).read_bytes() != before[n] for n in names)


def test_a_figure_without_data_is_removed_not_left_stale(tmp_path, capsys):
    write_grid(tmp_path, seeds=2)
    study.study(out=tmp_path, max_runs=0, progress=False, **{**GRID, "seeds": 2})
    assert (tmp_path / "pairs.png").exists()
    for path in (tmp_path / "runs").glob("*.json"):
        if "softmax" not in path.name:
            path.unlink()                                   # one head left: no pairs
    study.study(out=tmp_path, max_runs=0, progress=False, heads=["softmax"],
                **{**GRID, "seeds": 2})
    assert not (tmp_path / "pairs.png").exists()
    assert f"removed {tmp_path / 'pairs.png'}" in capsys.readouterr().err


# ---------------------------------------------------------------- signals, orphans

CHILD = """
import signal, sys
if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from adaloss import cli
    sys.exit(cli.main(sys.argv[1:]))
"""


def _processes() -> dict:
    """{pid: (ppid, state, cmdline)} of every process."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        found[int(stat.parent.name)] = (int(fields[1]), fields[0], cmd)
    return found


def _alive(pids) -> list:
    procs = _processes()
    return [p for p in pids if p in procs and procs[p][1] not in ("Z", "X")]


def _children_of_study(pid: int, timeout: float = 120) -> list:
    """The study's two spawn workers and its resource tracker, once they exist."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = {p: cmd for p, (ppid, _, cmd) in _processes().items() if ppid == pid}
        workers = [p for p, cmd in kids.items() if b"spawn_main" in cmd]
        tracker = [p for p, cmd in kids.items() if b"resource_tracker" in cmd]
        if len(workers) == 2 and tracker:
            return workers + tracker
        time.sleep(0.2)
    pytest.fail(f"the study's workers and resource tracker did not start within {timeout} s")


@LINUX_PROC
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_no_worker_outlives_a_killed_study(tmp_path, shared_data, sig):
    script = tmp_path / "run_study.py"
    script.write_text(CHILD)
    out = tmp_path / "s"
    cmd = [sys.executable, str(script), "study", "--datasets", "mnist", "--presets", "report",
           "--seeds", "3", "--epochs", "3", "--subset", "3000", "--workers", "2",
           "--data-root", str(shared_data), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    children = []
    try:
        assert proc.stdout.readline().startswith("study: ")
        children = _children_of_study(proc.pid)
        os.kill(proc.pid, sig)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the study's output stayed open 60 s after {sig.name}: a process "
                        "of the study outlived it")
        if sig == signal.SIGTERM:
            assert proc.returncode == 143 and "study terminated" in err, err
            assert "Traceback" not in err
        deadline = time.monotonic() + 30
        while _alive(children) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _alive(children)
        assert not left, f"{len(left)} of the study's processes outlived it: {left}"
        # no half-trained run was kept, and the lock of the killed study does not block
        for path in (out / "runs").glob("*.json"):
            assert json.loads(path.read_text())["history"]["epochs"] == [1, 2, 3]
        run = subprocess.run(cmd[:-6] + ["--max-runs", "0", "--out", str(out)],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
    finally:
        for pid in _alive(children + [proc.pid]):
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)


# ---------------------------------------------------------------- the command line


def adaloss_cli(*args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "adaloss", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_bad_arguments_are_refused_before_any_folder_is_made(tmp_path, shared_data):
    out = tmp_path / "res"
    base = ["reproduce", "--dataset", "mnist", "--epochs", "1", "--data-root", shared_data,
            "--no-progress", "--no-figures", "--out", out]
    for extra, needle in ((["--threads", "5000"], f"--threads: expected at most {_core.MAX_THREADS} threads"),
                          (["--lr", "1e5"], "--lr: expected a learning rate of at most 1"),
                          (["--subset", "100000"],
                           "--subset: 100,000 training images asked for, but mnist has 60,000")):
        run = adaloss_cli(*base, *extra, cwd=tmp_path)
        assert run.returncode == 2 and needle in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
        assert not out.exists() and not out.with_name("res.partial").exists()
    study_base = ["study", "--datasets", "mnist", "--presets", "fair", "--seeds", "1",
                  "--data-root", shared_data, "--out", out]
    for extra, needle in ((["--threads-per-worker", "5000"], f"expected at most {_core.MAX_THREADS} threads"),
                          (["--subset", "100000"], "subset: 100,000 training images asked for, "
                                                   "but mnist has 60,000")):
        run = adaloss_cli(*study_base, *extra, cwd=tmp_path)
        assert run.returncode == 2 and needle in run.stderr, run.stderr
        assert "Traceback" not in run.stderr and not out.exists()


def test_reproduce_keeps_the_unfinished_results_of_an_earlier_run(tmp_path, shared_data):
    out = tmp_path / "res"
    partial = tmp_path / "res.partial"
    partial.mkdir()
    (partial / "results.json").write_text('{"runs": ["three days of training"]}')
    run = adaloss_cli("reproduce", "--dataset", "mnist", "--heads", "arcface", "--epochs", "1",
                      "--subset", "128", "--threads", "1", "--data-root", shared_data,
                      "--no-progress", "--no-figures", "--out", out, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert f"{partial} held the unfinished results of an earlier run; moved them to" in run.stderr
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("res.partial-")]
    assert len(aside) == 1 and str(aside[0]) in run.stderr
    assert "three days" in (aside[0] / "results.json").read_text()
    assert json.loads((out / "results.json").read_text())["runs"][0]["head"] == "arcface"


def test_reproduce_on_a_full_or_read_only_disk_names_the_path(small_tmpfs, shared_data):
    args = ["reproduce", "--dataset", "mnist", "--heads", "arcface", "--epochs", "1",
            "--subset", "128", "--threads", "1", "--data-root", shared_data, "--no-progress",
            "--no-figures"]
    _fill(small_tmpfs, leave=0)
    run = adaloss_cli(*args, "--out", small_tmpfs / "res", cwd=small_tmpfs.parent)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "No space left on device" in run.stderr
    assert f"{small_tmpfs / 'res.partial'}" in run.stderr
    (small_tmpfs / "filler").unlink()
    remount = subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)],
                             capture_output=True, text=True)
    if remount.returncode != 0:
        pytest.skip(f"cannot remount the tmpfs read-only: {remount.stderr.strip()}")
    run = adaloss_cli(*args, "--out", small_tmpfs / "ro", cwd=small_tmpfs.parent)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "Read-only file system" in run.stderr and str(small_tmpfs / "ro.partial") in run.stderr


def _results(tmp_path) -> dict:
    config = presets.runs("mnist", "report")[0]
    record = fake_record(config, 0)
    record.update(theta_hist={"counts": [1, 2], "edges": [0.0, 90.0, 180.0]},
                  sample_indices=[1, 2], sample_predictions=[3, 4])
    return {"dataset": "mnist", "preset": "report", "runs": [record]}


def test_plot_validates_results_json_and_never_downloads(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "res"
    folder.mkdir()
    path = folder / "results.json"
    path.write_text('{"dataset": "mnist", "runs": [')                    # truncated
    assert cli.main(["plot", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not a readable JSON file" in err
    good = _results(tmp_path)
    for field, change in (("runs", dict(good, runs={})),
                          ("runs[0].history", dict(good, runs=[dict(good["runs"][0],
                                                                    history=[1, 2])])),
                          ("runs[0].theta_hist", dict(good, runs=[dict(good["runs"][0],
                                                                       theta_hist={"counts": 1})])),
                          ("runs[0].sample_indices", dict(good, runs=[dict(
                              good["runs"][0], sample_indices=["a", "b"])]))):
        path.write_text(json.dumps(change))
        assert cli.main(["plot", str(folder)]) == 2, field
        err = capsys.readouterr().err
        assert f"{path}: field {field!r}" in err, err
    assert not list(folder.glob("*.png"))
    # the data set is not on this machine: figures without the sample grid, no download
    downloads = []
    monkeypatch.setattr(adaloss.datasets, "download", lambda *a, **k: downloads.append(a)
                        or (_ for _ in ()).throw(OSError("offline")))
    empty = tmp_path / "empty"
    empty.mkdir()
    path.write_text(json.dumps(good))
    assert cli.main(["plot", str(folder), "--data-root", str(empty)]) == 0
    err = capsys.readouterr().err
    assert downloads == [] and "no sample grid" in err and "never downloads" in err
    assert (folder / "comparison.png").exists() and not (folder / "samples.png").exists()


def test_records_outside_the_asked_heads_must_match_too(tmp_path, capsys):
    # every record in the folder is summarised under the new command line
    write_grid(tmp_path, subset=200)
    assert study.study(out=tmp_path, max_runs=0, progress=False, heads=["softmax"],
                       **GRID)["runs"] == 4
    with pytest.raises(study.RecordsMismatch) as err:
        study.study(out=tmp_path, max_runs=0, progress=False, heads=["softmax"],
                    **{**GRID, "subset": 300})
    assert len(err.value.mismatches) == 4
    # a run no preset makes is never taken as matching
    path = tmp_path / "runs" / "mnist-fair-cosface-seed0.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), preset="best",
                                    name="mnist-best-cosface")))
    path.rename(tmp_path / "runs" / "mnist-best-cosface-seed0.json")
    with pytest.raises(study.RecordsMismatch, match="mnist/best/cosface"):
        study.study(out=tmp_path, max_runs=0, progress=False, **GRID)
    # --rerun-mismatched sets aside what is outside the grid without training it
    summary = study.study(out=tmp_path, max_runs=0, progress=False, heads=["softmax"],
                          rerun_mismatched=True, **GRID)
    assert summary["runs"] == 3
    assert "not in this command's grid" in capsys.readouterr().err
    assert (tmp_path / "runs" / ".mismatched" / "mnist-best-cosface-seed0.json").exists()


def test_a_worker_refuses_a_subset_larger_than_its_data(shared_data, monkeypatch):
    # a data root with fewer images than the official set: the run fails by name
    monkeypatch.setattr(study, "_DATA_CACHE", {})
    with pytest.raises(ValueError, match="subset: 60,001 training images asked for, but mnist"):
        study._load("mnist", shared_data, 60001)
