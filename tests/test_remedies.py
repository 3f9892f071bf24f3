"""The ArcFace-trap remedies in training and on the command line: margin and
softmax warm-ups (fit), head settings from the CLI, per-epoch theta_y
histograms and their figure."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adaloss import cli, nn, plots, presets, study, training

ROOT = Path(__file__).resolve().parents[1]
C, D = 4, 8


def _data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 1, 4, 4)).astype(np.uint8)
    return x, (np.arange(n) % C).astype(np.int64)


def _trainer(head_cls=nn.ArcFace, seed=0, **kw):
    nn.manual_seed(seed)
    net = nn.Sequential([nn.Flatten(), nn.Linear(16, D)], input_shape=(1, 4, 4))
    head = head_cls(C, D, **kw)
    return nn.Trainer(net, head, nn.Adam(net.parameters() + head.parameters(), lr=1e-2))


def _record_margins(trainer):
    """Wrap trainer.step to read the head's margins back before every step."""
    seen, step = [], trainer.step

    def recording(x, y):
        head = trainer.head
        seen.append((head.m1, head.m2, head.m3) if head.kind == "CombinedMargin" else head.m)
        return step(x, y)
    trainer.step = recording
    return seen


def test_margin_factor_schedule():
    assert training.margin_factor(0, 10, margin_warmup=2) == 0.0
    assert training.margin_factor(5, 10, margin_warmup=2) == 0.25
    assert training.margin_factor(20, 10, margin_warmup=2) == 1.0
    assert training.margin_factor(19, 10, softmax_warmup=2) == 0.0
    assert training.margin_factor(20, 10, softmax_warmup=2) == 1.0
    assert training.margin_factor(25, 10, 1, 2) == 0.5      # softmax, then the ramp
    assert training.margin_factor(0, 10) == 1.0


def test_margin_warmup_per_step_read_back_through_the_head():
    x, y = _data()
    trainer = _trainer(m=0.5)
    seen = _record_margins(trainer)
    history = training.fit(trainer, x, y, epochs=3, batch_size=8, progress=False,
                           margin_warmup=2)
    steps = 6
    expected = [0.5 * min(1.0, t / (2 * steps)) for t in range(3 * steps)]
    np.testing.assert_allclose(seen, expected, rtol=1e-6)
    assert history.margin_factor == pytest.approx([5 / 12, 11 / 12, 1.0])
    assert trainer.head.m == 0.5          # the configured margin after fit


def test_margin_warmup_first_loss_is_the_m0_loss():
    x, y = _data()
    warm = training.fit(_trainer(m=0.5), x, y, epochs=1, batch_size=8, progress=False,
                        margin_warmup=3)
    zero = training.fit(_trainer(m=0.0), x, y, epochs=1, batch_size=8, progress=False)
    full = training.fit(_trainer(m=0.5), x, y, epochs=1, batch_size=8, progress=False)
    assert warm.step_losses[0][0] == zero.step_losses[0][0]
    assert warm.step_losses[0][0] != full.step_losses[0][0]


def test_combined_head_warmup_scales_its_margins():
    x, y = _data()
    trainer = _trainer(nn.CombinedMargin, m1=1.5, m2=0.3, m3=0.2)
    seen = _record_margins(trainer)
    training.fit(trainer, x, y, epochs=2, batch_size=8, progress=False, margin_warmup=1)
    assert seen[0] == (1.0, 0.0, 0.0)
    np.testing.assert_allclose(seen[3], (1.25, 0.15, 0.1), rtol=1e-6)
    assert seen[-1] == (1.5, 0.3, 0.2)
    assert (trainer.head.m1, trainer.head.m2, trainer.head.m3) == (1.5, 0.3, 0.2)


def test_softmax_warmup_trains_with_m0_then_switches():
    x, y = _data()
    trainer = _trainer(nn.CosFace, m=0.4)
    seen = _record_margins(trainer)
    history = training.fit(trainer, x, y, epochs=3, batch_size=8, progress=False,
                           softmax_warmup=2)
    assert seen[:12] == [0.0] * 12 and all(abs(m - 0.4) < 1e-7 for m in seen[12:])
    assert history.margin_factor == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("head_cls,kw", [(nn.ArcFace, {"rule": "fallback"}),
                                         (nn.ArcFace, {"rule": "easy"}),
                                         (nn.ArcFace, {"rule": "straight-through"}),
                                         (nn.CosFace, {})])
def test_margin_zero_is_softmax_on_the_normalised_class_weights(head_cls, kw):
    rng = np.random.default_rng(1)
    head = head_cls(C, D, s=16.0, m=0.5, **kw)
    head.set_m(0.0)
    emb = rng.standard_normal((20, D)).astype(np.float32)
    labels = (np.arange(20) % C).astype(np.int64)
    loss = head.forward(emb, labels)
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = head.weight / np.linalg.norm(head.weight, axis=1, keepdims=True)
    z = 16.0 * e.astype(np.float64) @ w.T.astype(np.float64)
    ref = np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(20), labels])
    assert loss == pytest.approx(ref, rel=1e-4)


def test_set_m_is_validated_and_changes_nothing_on_error():
    head = nn.ArcFace(C, D, m=0.5)
    for bad in (-0.1, 4.0, float("nan")):
        with pytest.raises(ValueError, match="m: expected a finite number"):
            head.set_m(bad)
    with pytest.raises(TypeError, match="m: expected a number"):
        head.set_m("0.1")
    assert head.m == 0.5
    with pytest.raises(TypeError, match="no margin"):
        nn.Softmax(C, D).set_m(0.1)
    comb = nn.CombinedMargin(C, D, m1=1.0, m2=0.3, m3=0.2)
    with pytest.raises(TypeError, match="set_margins"):
        comb.set_m(0.1)
    with pytest.raises(ValueError, match="m1"):
        comb.set_margins(0.0, 0.3, 0.2)
    assert (comb.m1, comb.m2, comb.m3) == (1.0, 0.3, 0.2)
    with pytest.raises(ValueError, match="margin_warmup"):
        training.fit(_trainer(), *_data(), margin_warmup=-1, progress=False)


def test_resume_mid_warmup_is_bit_identical(tmp_path):
    x, y = _data()
    kw = dict(batch_size=8, progress=False, margin_warmup=2, softmax_warmup=1, seed=3)
    whole = _trainer(m=0.5)
    h_whole = training.fit(whole, x, y, epochs=4, checkpoint_dir=tmp_path / "a", **kw)
    part = _trainer(m=0.5)
    training.fit(part, x, y, epochs=2, checkpoint_dir=tmp_path / "b", **kw)  # stops mid-warm-up
    resumed = _trainer(m=0.5)
    h_resumed = training.fit(resumed, x, y, epochs=4, checkpoint_dir=tmp_path / "b", **kw)
    assert h_resumed.train_loss == h_whole.train_loss
    assert h_resumed.margin_factor == h_whole.margin_factor
    for a, b in zip(whole.net.parameters(), resumed.net.parameters()):
        assert np.array_equal(a.data, b.data)
    assert np.array_equal(whole.head.weight, resumed.head.weight)


def test_diagnostics_one_histogram_per_epoch():
    x, y = _data()
    history = training.fit(_trainer(), x, y, epochs=2, batch_size=8, progress=False,
                           diagnostics=(x[:30], y[:30]))
    assert len(history.theta_hist) == 2
    assert all(len(h) == len(training.THETA_EDGES_DEG) - 1 and sum(h) == 30
               for h in history.theta_hist)
    stats = training.margin_stats(*_fit_and_get(x, y), x[:30], y[:30])
    assert stats["theta_deg"].shape == (30,)
    with pytest.raises(TypeError, match="diagnostics"):
        training.fit(_trainer(), x, y, progress=False, diagnostics=[x, y])


def _fit_and_get(x, y):
    trainer = _trainer()
    training.fit(trainer, x, y, epochs=1, batch_size=8, progress=False)
    return trainer.net, trainer.head


def test_theta_epochs_figure(tmp_path):
    runs = [{"name": "a", "head": "arcface",
             "history": {"theta_hist": [[0] * 27 + [10] + [0] * 8, [0] * 34 + [10, 0]]},
             "diagnostics": {"edges_deg": list(training.THETA_EDGES_DEG)}}]
    fig = plots.theta_epochs(runs)
    assert "100 % trapped at epoch 2" in fig.axes[0].get_title()
    plots.save(fig, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="theta_hist"):
        plots.theta_epochs([{"name": "x", "head": "arcface", "history": {}}])


def test_presets_overrides_names_and_old_records():
    configs = presets.runs("cifar10", "fair", 20, ["combined"])
    assert [c.name for c in configs][-1] == "cifar10-fair-combined-1-0.3-0.2"
    easy = presets.with_overrides(configs, rule="easy")
    assert [c.name for c in easy if c.head == "arcface"] == ["cifar10-fair-arcface-easy"]
    assert easy[2].to_dict()["head_kwargs"]["rule"] == "easy"
    warm = presets.with_overrides(configs, margin_warmup=5)
    assert warm[0].name == "cifar10-fair-softmax" and warm[0].margin_warmup == 0
    assert warm[2].name == "cifar10-fair-arcface-mwarm5"
    assert presets.RunConfig.from_dict(warm[2].to_dict()).margin_warmup == 5
    same = presets.with_overrides(configs, rule="fallback", m=0.5)
    assert same[2].to_dict() == configs[2].to_dict() and same[2].name == configs[2].name
    assert same[1].name == "cifar10-fair-cosface-m0.5"       # its preset margin is 0.4
    with pytest.raises(ValueError, match="rule: only the paper ArcFace"):
        presets.with_overrides(presets.runs("mnist", "report"), rule="easy")
    with pytest.raises(ValueError, match=r"m: the cosface head expects .* \[0, pi\]"):
        presets.with_overrides(configs, m=3.5)
    with pytest.raises(ValueError, match="h: none of the heads"):
        presets.with_overrides(configs[:3], h=0.5)
    # every committed study record loads and keeps its name and form; the
    # grid's (named after their cell alone) with the defaults, the remedies'
    # named after what they change
    files = sorted((ROOT / "benchmarks" / "study" / "runs").glob("*.json"))
    assert files
    remedies = 0
    for path in files:
        record = json.loads(path.read_text())
        config = presets.RunConfig.from_dict(record["config"])
        assert config.to_dict() == record["config"] and config.name == record["name"]
        preset_run = next((c for c in presets.runs(config.dataset, config.preset, config.epochs)
                           if c.head == config.head), None)
        plain = preset_run is not None and preset_run.to_dict() == config.to_dict()
        assert plain == (config.name == f"{config.dataset}-{config.preset}-{config.head}"), \
            config.name
        remedies += not plain
    assert len(files) - remedies == 64
    tasks = study.plan(["cifar10"], ["fair"], {"cifar10": 3}, 20, ["arcface", "combined"],
                       {"softmax_warmup": 2})
    assert [t[0] for t in tasks[:2]] == ["cifar10-fair-arcface-swarm2-seed0",
                                         "cifar10-fair-combined-1-0.3-0.2-swarm2-seed0"]


@pytest.mark.parametrize("args,message", [
    (["--arcface-rule", "easyy"], "invalid choice: 'easyy'"),
    (["--m", "-1"], "--m: expected a non-negative number"),
    (["--margin-warmup", "-2"], "--margin-warmup: expected a non-negative integer"),
    (["--softmax-warmup", "x"], "--softmax-warmup: expected a non-negative integer"),
    (["--m1", "0"], "--m1: expected a positive number"),
    (["--m", "4"], "m: the cosface head expects a finite number in [0, pi]"),
    (["--m1", "11"], "m1: the combined head expects a finite number in (0, 10]"),
    (["--h", "0.5", "--heads", "arcface"], "h: none of the heads"),
])
def test_cli_bad_head_settings_fail_clearly_and_write_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        sys.exit(cli.main(["reproduce", "--dataset", "mnist", "--preset", "fair", "--epochs",
                           "1", "--out", str(out), "--data-root", str(tmp_path / "none")]
                          + args))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    if "choice" in message:
        assert "'fallback', 'easy', 'clip', 'straight-through'" in err
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    assert cli.main(["study", "--out", str(tmp_path / "st"), "--datasets", "mnist",
                     "--presets", "report", "--arcface-rule", "easy"]) == 2
    assert not (tmp_path / "st").exists()


@pytest.mark.slow
def test_cli_reproduce_records_rule_warmup_and_diagnostics(tmp_path, shared_data):
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "adaloss", "reproduce", "--dataset", "mnist", "--preset",
           "fair", "--heads", "arcface", "--arcface-rule", "easy", "--margin-warmup", "1",
           "--epochs", "1", "--subset", "256", "--data-root", str(shared_data), "--out",
           str(out), "--no-progress", "--threads", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    results = json.loads((out / "results.json").read_text())
    (record,) = results["runs"]
    assert record["name"] == "mnist-fair-arcface-easy-mwarm1"
    assert record["config"]["head_kwargs"]["rule"] == "easy"
    assert record["config"]["margin_warmup"] == 1
    assert record["history"]["margin_factor"] == [0.75]          # 3 of 4 steps at the last
    (hist,) = record["history"]["theta_hist"]
    assert sum(hist) == record["diagnostics"]["images"] == 51     # the 256 // 5 test images
    assert (out / "theta_epochs.png").stat().st_size > 1000
    (out / "theta_epochs.png").unlink()
    replot = subprocess.run([sys.executable, "-m", "adaloss", "plot", str(out), "--data-root",
                             str(shared_data)], capture_output=True, text=True, cwd=tmp_path)
    assert replot.returncode == 0, replot.stderr
    assert (out / "theta_epochs.png").exists()
    assert math.isfinite(record["test_accuracy"])


def test_study_cells_keep_remedies_apart():
    base = {"dataset": "cifar10", "preset": "fair", "head": "arcface"}
    assert study._cell_head(dict(base, name="cifar10-fair-arcface")) == "arcface"
    assert study._cell_head(dict(base, name="cifar10-fair-arcface-easy")) == "arcface-easy"
    assert study._cell_head(dict(base, name="cifar10-fair-combined-1-0.3-0.2",
                                 head="combined")) == "combined-1-0.3-0.2"
