"""fit, evaluate, presets and checkpoints on real data subsets."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import adaloss
from adaloss import checkpoint, datasets, fileio, presets, training


@pytest.fixture(scope="module")
def mnist_small(shared_data):
    data = datasets.load_mnist(shared_data, download=False)
    return datasets.subset(data, 512, 500, seed=0)


@pytest.mark.slow
def test_fit_learns_on_512_images(mnist_small):
    config = presets.runs("mnist", "fair")[3]   # AdaFace paper head on the fair backbone
    trainer = presets.build(config, seed=0)
    before = training.evaluate(trainer.net, trainer.head, mnist_small.test_images,
                               mnist_small.test_labels)
    hist = training.fit(trainer, mnist_small.train_images, mnist_small.train_labels, epochs=3,
                        x_test=mnist_small.test_images, y_test=mnist_small.test_labels,
                        progress=False)
    assert hist.epochs == [1, 2, 3] and len(hist.seconds) == 3
    assert hist.train_loss[-1] < hist.train_loss[0]
    assert hist.test_accuracy[-1] > 0.5 > before + 0.2   # chance is 0.1
    assert len(hist.step_losses[0]) == 8                 # 512 / 64


def test_report_presets_match_design():
    arc, ada = presets.runs("cifar10", "report")
    assert arc.head_config == presets.HeadConfig("arcface", s=10.0, m=0.5, variant="report")
    assert arc.lr == 1e-4
    assert ada.head_config.variant == "report" and ada.lr == 1e-3 and ada.epochs == 20
    assert not arc.train_head and not ada.train_head and arc.eval_rule == "report"
    assert ada.layers[-1] == presets.LayerSpec("l2norm")
    paper_ada = presets.runs("mnist", "paper")[1]
    assert paper_ada.train_head and paper_ada.layers[-1] != presets.LayerSpec("l2norm")
    fair = presets.runs("mnist", "fair")
    assert [c.head for c in fair] == ["softmax", "cosface", "arcface", "adaface"]
    assert len({json.dumps(c.to_dict()["layers"]) for c in fair}) == 1
    assert {c.lr for c in fair} == {1e-3}
    # the same seed gives every fair head the same initial network
    nets = [presets.build(c, seed=4).net.state_dict() for c in fair]
    for k in nets[0]:
        assert all(np.array_equal(nets[0][k], n[k]) for n in nets[1:])
    with pytest.raises(ValueError, match="preset"):
        presets.runs("mnist", "best")


def test_report_trainer_keeps_class_weights_frozen(mnist_small):
    trainer = presets.build(presets.runs("mnist", "report")[0], seed=0)
    w0 = trainer.head.weight.copy()
    training.fit(trainer, mnist_small.train_images[:128], mnist_small.train_labels[:128],
                 epochs=1, progress=False)
    np.testing.assert_array_equal(trainer.head.weight, w0)
    trainer = presets.build(presets.runs("mnist", "paper")[0], seed=0)
    w0 = trainer.head.weight.copy()
    training.fit(trainer, mnist_small.train_images[:128], mnist_small.train_labels[:128],
                 epochs=1, progress=False)
    assert not np.array_equal(trainer.head.weight, w0)


def test_report_arcface_evaluation_applies_the_margin(mnist_small):
    trainer = presets.build(presets.runs("mnist", "report")[0], seed=0)
    x, y = mnist_small.test_images, mnist_small.test_labels
    history = training.fit(trainer, mnist_small.train_images, mnist_small.train_labels,
                           epochs=1, x_test=x, y_test=y, eval_rule="report", progress=False)
    # fit scores both rules from one forward pass: the same as two evaluations
    # (batches of 37 put several batch boundaries inside the test set)
    assert history.test_accuracy == [training.evaluate(trainer.net, trainer.head, x, y, "report",
                                                       batch_size=37)]
    assert history.test_accuracy_plain == [training.evaluate(trainer.net, trainer.head, x, y,
                                                             batch_size=37)]
    emb = trainer.net.forward(x)
    plain = trainer.head.logits(emb)
    report = trainer.head.logits(emb, y, rule="report")
    diff = plain - report
    np.testing.assert_allclose(diff[np.arange(len(y)), y], 30 * 0.5, rtol=1e-5)
    diff[np.arange(len(y)), y] = 0
    assert np.all(diff == 0)
    assert training.evaluate(trainer.net, trainer.head, x, y, "report") <= \
        training.evaluate(trainer.net, trainer.head, x, y, "plain")


@pytest.mark.slow
def test_checkpoint_resume_is_bit_identical(mnist_small, tmp_path):
    config = presets.runs("mnist", "paper")[1]  # AdaFace paper: running statistics too
    x, y = mnist_small.train_images[:256], mnist_small.train_labels[:256]
    straight = presets.build(config, seed=1)
    training.fit(straight, x, y, epochs=4, seed=5, progress=False)
    resumed = presets.build(config, seed=1)
    training.fit(resumed, x, y, epochs=2, seed=5, progress=False, checkpoint_dir=tmp_path)
    again = presets.build(config, seed=99)          # different weights, overwritten by the load
    hist = training.fit(again, x, y, epochs=4, seed=5, progress=False, checkpoint_dir=tmp_path)
    assert hist.epochs == [1, 2, 3, 4]
    for k, v in straight.net.state_dict().items():
        np.testing.assert_array_equal(v, again.net.state_dict()[k], err_msg=k)
    np.testing.assert_array_equal(straight.head.weight, again.head.weight)
    assert straight.head.running_mean == again.head.running_mean
    assert straight.optimizer.step_count == again.optimizer.step_count == 16


def test_checkpoint_rejects_damaged_files(mnist_small, tmp_path):
    trainer = presets.build(presets.runs("mnist", "paper")[0], seed=0)
    path = tmp_path / "a.ckpt"
    checkpoint.save(path, trainer.net, trainer.head, trainer.optimizer, epoch=3)
    raw = path.read_bytes()
    assert checkpoint.load(path, trainer.net, trainer.head, trainer.optimizer) == {"epoch": 3}
    for name, data, match in [("trunc", raw[:len(raw) // 2], "checksum"),
                              ("flip", raw[:100] + bytes([raw[100] ^ 1]) + raw[101:], "checksum"),
                              ("magic", b"XXXXXXXX" + raw[8:], "magic"),
                              ("version", raw[:8] + (7).to_bytes(4, "little") + raw[12:], "version"),
                              ("empty", b"", "magic")]:
        bad = tmp_path / f"{name}.ckpt"
        bad.write_bytes(data)
        with pytest.raises(checkpoint.CheckpointError, match=match):
            checkpoint.load(bad, trainer.net, trainer.head, trainer.optimizer)
    other = presets.build(presets.runs("mnist", "paper")[1], seed=0)   # another network
    with pytest.raises(checkpoint.CheckpointError, match="architecture"):
        checkpoint.load(path, other.net, other.head, other.optimizer)


def test_checkpoint_save_never_destroys_the_previous_one(mnist_small, tmp_path, monkeypatch):
    trainer = presets.build(presets.runs("mnist", "paper")[0], seed=0)
    path = tmp_path / "latest.ckpt"
    checkpoint.save(path, trainer.net, trainer.head, trainer.optimizer, epoch=1)
    good = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "fsync", crash)
    with pytest.raises(OSError):
        checkpoint.save(path, trainer.net, trainer.head, trainer.optimizer, epoch=2)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["latest.ckpt"]   # no temporary left


def test_nonfinite_step_is_rejected_and_fit_says_where(mnist_small):
    trainer = presets.build(presets.runs("mnist", "fair")[0], seed=0)   # softmax head
    before = trainer.net.state_dict()
    m_before = trainer.optimizer.state_dict()
    trainer.net.parameters()[-1].data[...] = 1e38                       # logits overflow
    trainer.head.weight[...] = 1e38
    x, y = mnist_small.train_images[:64], mnist_small.train_labels[:64]
    snapshot = trainer.net.state_dict()
    with pytest.raises(adaloss.NonFiniteError, match="not applied"):
        trainer.step(x, y)
    for k, v in trainer.net.state_dict().items():
        np.testing.assert_array_equal(v, snapshot[k])
    assert trainer.optimizer.step_count == 0
    np.testing.assert_array_equal(trainer.optimizer.state_dict()["exp_avg"], m_before["exp_avg"])
    with pytest.raises(adaloss.NonFiniteError, match="epoch 1, step 1"):
        training.fit(trainer, x, y, epochs=1, progress=False)
    hist = training.fit(trainer, x, y, epochs=1, progress=False, skip_nonfinite=True)
    assert hist.skipped_steps == 1
    del before


SIGINT_SCRIPT = r"""
import sys, time, numpy as np, adaloss
from adaloss import presets, training
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (20000, 1, 28, 28), dtype=np.uint8); y = rng.integers(0, 10, 20000)
trainer = presets.build(presets.runs("mnist", "fair")[0], seed=0)
print("ready", flush=True)
t0 = time.time()
hist = training.fit(trainer, x, y, epochs=50, progress=False, checkpoint_dir=sys.argv[1],
                    callback=lambda e, h: print("epoch", e, flush=True))
print("returned", hist.interrupted, len(hist.epochs), round(time.time() - t0, 1), flush=True)
"""


@pytest.mark.slow
def test_ctrl_c_returns_history_and_keeps_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SIGINT_SCRIPT, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    assert proc.stdout.readline().strip() == "ready"
    assert proc.stdout.readline().startswith("epoch 1")   # a checkpoint exists now
    saved = (tmp_path / "latest.ckpt").read_bytes()
    time.sleep(0.5)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    lag = time.time() - sent
    assert proc.returncode == 0, out
    line = [ln for ln in out.splitlines() if ln.startswith("returned")][0]
    assert line.split()[1] == "True"
    assert lag < 5.0   # one step is ~30 ms; the process also has to exit
    now = (tmp_path / "latest.ckpt").read_bytes()
    assert now[:8] == b"ADALOSS\0" and len(now) == len(saved)


def test_margin_stats_gives_every_head_its_target_angle(mnist_small):
    # softmax has no angle in its logits: margin_stats takes it from the vectors,
    # the same angle the margin heads report from C
    x, y = mnist_small.test_images[:300], mnist_small.test_labels[:300]
    angles = {}
    for config in presets.runs("mnist", "fair"):
        trainer = presets.build(config, seed=0)
        stats = training.margin_stats(trainer.net, trainer.head, x, y, batch_size=128)
        emb = trainer.embed(x).astype(np.float64)
        w = trainer.head.weight.astype(np.float64)
        cos = np.sum(emb * w[y], 1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(w[y], axis=1)
        assert stats["theta_deg"].shape == (300,) and np.all(np.isfinite(stats["theta_deg"]))
        np.testing.assert_allclose(stats["theta_deg"], np.degrees(np.arccos(cos)), atol=0.05)
        angles[config.head] = stats["theta_deg"]
        assert (stats["quality"] is None) == (config.head != "adaface")
    assert set(angles) == {"softmax", "cosface", "arcface", "adaface"}


def test_run_configs_are_typed_and_keep_their_json_form():
    # the JSON form is the one every committed record holds: layers as lists,
    # the head's settings as the dict head_kwargs
    arc = presets.runs("mnist", "report")[0]
    d = arc.to_dict()
    assert d["layers"][0] == ["conv", 1, 32] and d["layers"][1] == ["relu"]
    assert d["head_kwargs"] == {"s": 30.0, "m": 0.5, "variant": "report"}
    again = presets.RunConfig.from_dict(json.loads(json.dumps(d)))
    assert again == arc and again.to_dict() == d
    assert all(isinstance(layer, presets.LayerSpec) for layer in again.layers)
    assert presets.LayerSpec.coerce(("linear", 256, 2)) == presets.LayerSpec("linear", 256, 2)
    with pytest.warns(DeprecationWarning, match="head_config"):
        assert arc.head_kwargs == d["head_kwargs"]
    with pytest.warns(DeprecationWarning):
        arc.head_kwargs = {"s": 16.0, "m": 0.2, "variant": "report"}
    assert arc.head_config == presets.HeadConfig("arcface", s=16.0, m=0.2, variant="report")


@pytest.mark.parametrize("bad", [
    lambda: presets.HeadConfig("sphereface"),
    lambda: presets.HeadConfig("cosface", variant="report"),     # CosFace has no variants
    lambda: presets.HeadConfig("softmax", s=30.0),
    lambda: presets.LayerSpec("conv", 0, 32),
    lambda: presets.LayerSpec("relu", 3, 3),
    lambda: presets.LayerSpec("dropout"),
    lambda: presets.RunConfig("mnist", "fair", "arcface", [], presets.HeadConfig("adaface"),
                              lr=1e-3, epochs=1),
])
def test_typed_config_rejects_what_it_cannot_build(bad):
    with pytest.raises(ValueError):
        bad()


def test_heads_say_what_their_last_batch_holds():
    heads = {c.head: presets.build(c).head for c in presets.runs("mnist", "fair")}
    assert [h for h, head in heads.items() if head.has_quality] == ["adaface"]
    assert [h for h, head in heads.items() if not head.has_target_angle] == ["softmax"]
    assert heads["arcface"].kind == "ArcFace"


def test_fit_refuses_to_resume_a_checkpoint_of_another_run(mnist_small, tmp_path):
    config = presets.runs("mnist", "fair")[0]
    x, y = mnist_small.train_images[:128], mnist_small.train_labels[:128]
    training.fit(presets.build(config, seed=0), x, y, epochs=1, seed=5, batch_size=64,
                 progress=False, checkpoint_dir=tmp_path)
    saved = (tmp_path / checkpoint.LATEST).read_bytes()
    for change, needle in ((dict(seed=6), "seed 5 there, 6 now"),
                           (dict(batch_size=32), "batch_size 64 there, 32 now"),
                           (dict(y=y[::-1].copy()), "labels_crc32"),
                           (dict(x=x[:96], y=y[:96]), "train_shape"),
                           (dict(epochs=0), "at epoch 1, beyond the 0 asked for")):
        trainer = presets.build(config, seed=3)
        before = trainer.net.state_dict()
        kwargs = {"x": x, "y": y, "epochs": 2, "seed": 5, "batch_size": 64, **change}
        with pytest.raises(checkpoint.CheckpointError, match=needle) as err:
            training.fit(trainer, kwargs.pop("x"), kwargs.pop("y"), progress=False,
                         checkpoint_dir=tmp_path, **kwargs)
        assert str(tmp_path / checkpoint.LATEST) in str(err.value)
        assert trainer.optimizer.step_count == 0        # nothing loaded, nothing trained
        for k, v in before.items():
            np.testing.assert_array_equal(v, trainer.net.state_dict()[k])
    other_lr = presets.build(config, seed=3)
    other_lr.optimizer.lr = 1e-2
    with pytest.raises(checkpoint.CheckpointError, match="lr 0.001 there, 0.01 now"):
        training.fit(other_lr, x, y, epochs=2, seed=5, progress=False, checkpoint_dir=tmp_path)
    assert (tmp_path / checkpoint.LATEST).read_bytes() == saved
    # the same run resumes; resume=False starts over and replaces the checkpoint
    hist = training.fit(presets.build(config, seed=3), x, y, epochs=2, seed=5, progress=False,
                        checkpoint_dir=tmp_path)
    assert hist.epochs == [1, 2]
    hist = training.fit(presets.build(config, seed=3), x, y, epochs=1, seed=6, progress=False,
                        checkpoint_dir=tmp_path, resume=False)
    assert hist.epochs == [1]


def test_fit_resumes_an_old_checkpoint_without_settings_with_a_warning(mnist_small, tmp_path):
    config = presets.runs("mnist", "fair")[0]
    x, y = mnist_small.train_images[:128], mnist_small.train_labels[:128]
    trainer = presets.build(config, seed=0)
    hist = training.fit(trainer, x, y, epochs=1, seed=5, progress=False)
    training.save_training(tmp_path, trainer, 1, np.random.default_rng(5), hist)  # no settings
    with pytest.warns(UserWarning, match="without the run's settings") as caught:
        hist = training.fit(presets.build(config, seed=3), x, y, epochs=2, seed=5,
                            progress=False, checkpoint_dir=tmp_path)
    assert hist.epochs == [1, 2]
    assert caught[0].filename == __file__           # the warning names the caller's line


def test_fit_reads_the_checkpoint_it_resumes_once(mnist_small, tmp_path, monkeypatch):
    """The resume checks and the restore share one read of latest.ckpt, so
    the file checked is the file loaded."""
    config = presets.runs("mnist", "fair")[0]
    x, y = mnist_small.train_images[:128], mnist_small.train_labels[:128]
    training.fit(presets.build(config, seed=0), x, y, epochs=1, seed=5, progress=False,
                 checkpoint_dir=tmp_path)
    reads = []
    real_read = checkpoint.read
    monkeypatch.setattr(checkpoint, "read", lambda path, *a, **k: reads.append(path)
                        or real_read(path, *a, **k))
    hist = training.fit(presets.build(config, seed=3), x, y, epochs=2, seed=5, progress=False,
                        checkpoint_dir=tmp_path)
    assert hist.epochs == [1, 2]
    assert reads == [tmp_path / checkpoint.LATEST]
    # load_latest checks the epochs asked for with or without the run's settings
    trainer = presets.build(config, seed=3)
    with pytest.raises(checkpoint.CheckpointError, match="at epoch 2, beyond the 1 asked for"):
        training.load_latest(tmp_path, trainer, epochs=1)
    assert trainer.optimizer.step_count == 0
    assert training.load_latest(tmp_path, trainer, epochs=2)["epoch"] == 2


def test_a_checkpoint_dir_that_is_a_file_fails_before_training(mnist_small, tmp_path):
    trainer = presets.build(presets.runs("mnist", "fair")[0], seed=0)
    path = tmp_path / "ckpt"
    path.write_text("not a folder")
    with pytest.raises(ValueError, match=f"checkpoint_dir: {path} is a file"):
        training.fit(trainer, mnist_small.train_images[:64], mnist_small.train_labels[:64],
                     epochs=1, progress=False, checkpoint_dir=path)
    assert trainer.optimizer.step_count == 0
    (tmp_path / "d" / checkpoint.LATEST).mkdir(parents=True)
    with pytest.raises(ValueError, match="is a folder, expected a checkpoint file"):
        training.fit(trainer, mnist_small.train_images[:64], mnist_small.train_labels[:64],
                     epochs=1, progress=False, checkpoint_dir=tmp_path / "d")
    assert trainer.optimizer.step_count == 0
