"""Figures render with the expected axes, labels and markers; the CLI end to end.
Subprocesses run outside the project root, so `python -m` imports the installed
adaloss, not the source tree."""
import json
import subprocess
import sys

import numpy as np
import pytest

from adaloss import cli, plots
from adaloss.training import History


def test_comparison_marks_min_and_max(tmp_path):
    curves = {"adaface": [0.9, 0.5, 0.3, 0.35], "arcface": [2.0, 2.5, 1.2, 1.0]}
    fig = plots.comparison(curves, "MNIST")
    ax = fig.axes[0]
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == sorted(["(3, 0.3000)", "(1, 0.9000)", "(4, 1.0000)", "(2, 2.5000)"])
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "training loss"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["AdaLoss (AdaFace)", "ArcFace"]
    assert len(ax.collections) == 4   # a min and a max marker per curve
    path = plots.save(fig, tmp_path / "cmp.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.save(fig, tmp_path / "cmp.svg").read_text().lstrip().startswith("<?xml")
    with pytest.raises(ValueError, match="png or .svg"):
        plots.save(fig, tmp_path / "cmp.jpg")


def test_loss_curve_and_grid(tmp_path, rng):
    hist = History(epochs=[1, 2], train_loss=[1.0, 0.5])
    fig = plots.loss_curve(hist, "run")
    line = fig.axes[0].get_lines()[0]
    np.testing.assert_array_equal(line.get_ydata(), [1.0, 0.5])
    with pytest.raises(ValueError):
        plots.loss_curve([], "empty")
    imgs = rng.integers(0, 256, (10, 1, 28, 28), dtype=np.uint8)
    fig = plots.sample_grid(imgs, np.arange(10), np.r_[np.arange(9), 0], rows=2, cols=5)
    assert len(fig.axes) == 10
    assert fig.axes[0].get_title() == "true: 0\npred: 0"
    assert fig.axes[9].title.get_color() == "red"
    rgb = rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    fig = plots.sample_grid(rgb, np.arange(5), np.arange(5), ["a", "b", "c", "d", "e"], 1, 5)
    assert fig.axes[4].get_title() == "true: e\npred: e"
    plots.save(fig, tmp_path / "grid.png")


def test_margin_distributions(rng):
    recs = [{"head": "arcface", "theta_deg": rng.uniform(0, 90, 100), "quality": None},
            {"head": "adaface", "theta_deg": rng.uniform(0, 90, 100),
             "quality": rng.uniform(-1, 1, 100)}]
    fig = plots.margin_distributions(recs)
    assert len(fig.axes) == 2
    assert "θ_y" in fig.axes[0].get_xlabel() and "q" in fig.axes[1].get_xlabel()


def test_study_figures_draw_every_seed_and_the_report():
    cells = [{"dataset": "mnist", "preset": "report", "head": "arcface", "n": 3,
              "accuracies": [97.7, 97.9, 98.0], "mean": 97.87, "ci95": [97.5, 98.2],
              "margin_free_mean": 99.0, "report": 97.86},
             {"dataset": "mnist", "preset": "report", "head": "adaface", "n": 3,
              "accuracies": [99.0, 99.1, 98.9], "mean": 99.0, "ci95": [98.75, 99.25],
              "margin_free_mean": 99.0, "report": 99.11},
             {"dataset": "cifar10", "preset": "fair", "head": "adaface", "n": 1,
              "accuracies": [70.0], "mean": 70.0, "ci95": [None, None],
              "margin_free_mean": 70.0, "report": None}]
    pairs = [{"dataset": "mnist", "preset": "report", "a": "adaface", "b": "arcface", "n": 3,
              "diffs": [1.3, 1.2, 0.9], "mean_diff": 1.13, "ci95": [0.6, 1.6],
              "wilcoxon_p": 0.25}]
    fig = plots.study_accuracy({"cells": cells, "pairs": pairs})
    mnist, cifar = fig.axes
    assert mnist.get_title() == "mnist" and cifar.get_title() == "cifar10"
    offsets = np.concatenate([c.get_offsets() for c in mnist.collections])
    for x in (97.7, 97.9, 98.0, 99.0, 99.1, 98.9, 97.86, 99.11):   # seeds and report numbers
        assert np.isclose(offsets[:, 0], x).any(), x
    assert np.isclose(offsets[:, 0], 99.0).sum() >= 3   # ArcFace's margin-free mean drawn too
    assert [line.get_xdata().tolist() for line in mnist.get_lines()] == [[97.5, 98.2],
                                                                         [98.75, 99.25]]
    assert cifar.get_lines() == []          # one seed: no CI bar
    assert "AdaLoss (AdaFace) (3)" in [t.get_text() for t in mnist.get_yticklabels()][1]
    fig = plots.study_pairs({"cells": cells, "pairs": pairs})
    (ax,) = fig.axes
    assert np.isclose(ax.collections[0].get_offsets()[:, 0], [1.3, 1.2, 0.9]).all()
    assert [t.get_text() for t in ax.texts] == ["p = 0.25"]
    with pytest.raises(ValueError, match="summary"):
        plots.study_pairs({"cells": cells, "pairs": []})


def test_study_curves_draw_every_run_per_epoch():
    def record(dataset, preset, head, seed, acc, loss):
        return {"dataset": dataset, "preset": preset, "head": head, "seed": seed,
                "history": {"epochs": list(range(1, len(acc) + 1)), "test_accuracy": acc,
                            "train_loss": loss}}

    records = [record("cifar10", "fair", "arcface", 0, [0.56, 0.685, 0.60], [17.7, 12.5, 10.0]),
               record("cifar10", "fair", "adaface", 0, [0.57, 0.675, 0.66], [24.1, 8.0, 0.54]),
               record("cifar10", "fair", "adaface", 1, [0.55, 0.67, 0.65], [24.0, 8.1, 0.60]),
               record("mnist", "report", "arcface", 0, [0.97, 0.98], [3.0, 2.0])]
    fig = plots.study_curves(records)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["mnist, report: test accuracy", "mnist, report: training loss",
                      "cifar10, fair: test accuracy", "cifar10, fair: training loss"]
    acc_ax, loss_ax = fig.axes[2], fig.axes[3]
    assert len(acc_ax.get_lines()) == len(loss_ax.get_lines()) == 3     # one line per run
    drawn = sorted(line.get_ydata().tolist() for line in acc_ax.get_lines())
    assert np.allclose(drawn[0], [55, 67, 65]) and np.allclose(drawn[2], [57, 67.5, 66])
    assert [t.get_text() for t in acc_ax.get_legend().get_texts()] == ["AdaLoss (AdaFace)",
                                                                       "ArcFace"]
    assert loss_ax.get_yscale() == "log"
    with pytest.raises(ValueError, match="records"):
        plots.study_curves([])


@pytest.mark.slow
def test_cli_reproduce_end_to_end(tmp_path, shared_data):
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "adaloss", "reproduce", "--dataset", "mnist", "--preset",
           "report", "--epochs", "1", "--subset", "512", "--data-root", str(shared_data),
           "--out", str(out), "--no-progress", "--threads", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "| arcface |" in run.stdout and "97.86" in run.stdout and "99.11" in run.stdout
    results = json.loads((out / "results.json").read_text())
    assert [r["head"] for r in results["runs"]] == ["arcface", "adaface"]
    assert results["runs"][0]["config"]["head_kwargs"]["s"] == 30.0
    assert len(results["runs"][1]["history"]["train_loss"]) == 1
    for name in ("comparison", "samples", "margins", "loss_arcface", "loss_adaface"):
        assert (out / f"{name}.png").stat().st_size > 1000
    before = (out / "results.json").read_bytes()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr
    assert (out / "results.json").read_bytes() == before   # never overwritten


def test_cli_help_documents_every_option(tmp_path):
    text = cli.parser()._subparsers._group_actions[0].choices["reproduce"].format_help()
    for opt in ("--dataset", "--preset", "--epochs", "--seeds", "--data-root", "--out",
                "--threads", "--force", "--subset"):
        assert opt in text
    run = subprocess.run([sys.executable, "-m", "adaloss", "reproduce", "--dataset", "svhn"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and "invalid choice" in run.stderr
    run = subprocess.run([sys.executable, "-m", "adaloss", "reproduce", "--dataset", "mnist",
                          "--epochs", "0"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and "positive integer" in run.stderr
    study_help = cli.parser()._subparsers._group_actions[0].choices["study"].format_help()
    for opt in ("--datasets", "--presets", "--heads", "--seeds", "--out", "--workers",
                "--threads-per-worker", "--scheduler", "--max-runs"):
        assert opt in study_help
    run = subprocess.run([sys.executable, "-m", "adaloss", "study", "--heads", "arcfce",
                          "--out", str(tmp_path / "st")], capture_output=True, text=True,
                         cwd=tmp_path)
    assert run.returncode == 2 and "heads: expected some of" in run.stderr
    assert not (tmp_path / "st").exists()      # nothing written for a bad grid


@pytest.mark.slow
def test_cli_lr_sets_every_heads_learning_rate(tmp_path, shared_data):
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "adaloss", "reproduce", "--dataset", "mnist", "--preset",
           "paper", "--epochs", "1", "--subset", "256", "--data-root", str(shared_data),
           "--out", str(out), "--no-progress", "--no-figures", "--threads", "1", "--lr", "3e-4"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    results = json.loads((out / "results.json").read_text())
    assert [r["config"]["lr"] for r in results["runs"]] == [3e-4, 3e-4]
    assert "--lr 3e-4" in results["command"]
    for bad in ("0", "-0.001", "nan", "inf", "fast"):
        run = subprocess.run(cmd[:-1] + [bad] + ["--out", str(tmp_path / "bad")],
                             capture_output=True, text=True, cwd=tmp_path)
        assert run.returncode == 2 and "--lr: expected a positive number" in run.stderr, bad
    assert not (tmp_path / "bad").exists()
