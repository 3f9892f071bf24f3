"""Any data set: IDX folders, image folders and .npz files load, train and
evaluate end to end through the CLI; bad data raises errors naming the file;
preset networks adapt to the images' shape."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import adaloss
import synthetic
from adaloss import datasets, datasources, presets, runs
from adaloss.datasets import DataError

PKG_PARENT = str(Path(adaloss.__file__).resolve().parents[1])


def cli(*args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=PKG_PARENT)
    return subprocess.run([sys.executable, "-m", "adaloss", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture
def data():
    return synthetic.arrays(classes=6, per_class=30, shape=(1, 16, 16))


# ------------------------------------------------------------------ loading

def test_the_three_formats_load_the_same_arrays(tmp_path, data):
    x_tr, y_tr, x_te, y_te = data
    idx = datasources.load_any(synthetic.write_idx(tmp_path / "idx", *data))
    npz = datasources.load_any(synthetic.write_npz(tmp_path / "d.npz", *data, layout="NHWC"))
    nchw = datasources.load_any(synthetic.write_npz(tmp_path / "c.npz", *data, layout="NCHW"))
    synthetic.write_image_folder(tmp_path / "img" / "train", x_tr, y_tr)
    synthetic.write_image_folder(tmp_path / "img" / "test", x_te, y_te)
    img = datasources.load_any(tmp_path / "img")
    for d in (idx, npz, nchw):
        np.testing.assert_array_equal(d.train_images, x_tr)
        np.testing.assert_array_equal(d.test_labels, y_te)
        assert d.classes == [str(i) for i in range(6)]
    # the image folder orders files by name within each class folder: same set per class
    assert img.train_images.shape == x_tr.shape and img.classes == [f"class{i}" for i in range(6)]
    for c in range(6):
        got = {a.tobytes() for a in img.train_images[img.train_labels == c]}
        assert got == {a.tobytes() for a in x_tr[y_tr == c]}
    assert idx.name == "idx" and npz.name == "d"
    assert datasources.data_info(tmp_path / "d.npz")["checksum"] == "not checked: user data"
    assert datasources.data_info("mnist")["checksum"].startswith("verified")


def test_an_image_folder_is_split_by_a_seeded_fraction(tmp_path, data):
    x_tr, y_tr, _, _ = data
    folder = synthetic.write_image_folder(tmp_path / "flat", x_tr, y_tr)
    a = datasources.load_any(folder, test_fraction=0.25, seed=3)
    b = datasources.load_any(folder, test_fraction=0.25, seed=3)
    c = datasources.load_any(folder, test_fraction=0.25, seed=4)
    np.testing.assert_array_equal(a.test_images, b.test_images)
    assert not np.array_equal(a.test_images, c.test_images)
    assert len(a.test_labels) == 6 * 5 and len(a.train_labels) == 6 * 15
    assert np.bincount(a.test_labels).tolist() == [5] * 6
    with pytest.raises(DataError, match="test-fraction"):
        datasources.load_any(folder)
    with pytest.raises(ValueError, match="test_fraction"):
        datasources.load_any(folder, test_fraction=1.5)


# ------------------------------------------------------------------ bad data

def test_mixed_image_sizes_name_the_file(tmp_path, data):
    from PIL import Image

    folder = synthetic.write_image_folder(tmp_path / "img", *data[:2])
    odd = folder / "class2" / "9999.png"
    Image.fromarray(np.zeros((20, 16), np.uint8)).save(odd)
    with pytest.raises(DataError, match="9999.png.*same size"):
        datasources.load_any(folder, test_fraction=0.2)


def test_an_unreadable_image_names_the_file(tmp_path, data):
    folder = synthetic.write_image_folder(tmp_path / "img", *data[:2])
    (folder / "class1" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png: unreadable image"):
        datasources.load_any(folder, test_fraction=0.2)


def test_one_class_only_names_the_file(tmp_path, data):
    x_tr, y_tr, x_te, y_te = data
    path = synthetic.write_npz(tmp_path / "one.npz", x_tr, np.zeros_like(y_tr), x_te,
                               np.zeros_like(y_te))
    with pytest.raises(DataError, match=r"one.npz \[y_train\]: one class only"):
        datasources.load_any(path)


def test_labels_outside_0_to_c_minus_1_name_the_file(tmp_path, data):
    x_tr, y_tr, x_te, y_te = data
    path = synthetic.write_npz(tmp_path / "gap.npz", x_tr, y_tr * 2, x_te, y_te)   # 0, 2, 4 ...
    with pytest.raises(DataError, match=r"gap.npz \[y_train\]: labels must be 0..C-1"):
        datasources.load_any(path)
    path = synthetic.write_npz(tmp_path / "neg.npz", x_tr, y_tr - 1, x_te, y_te)
    with pytest.raises(DataError, match=r"neg.npz \[y_train\]: labels must be 0..C-1, found -1"):
        datasources.load_any(path)
    path = synthetic.write_npz(tmp_path / "test.npz", x_tr, y_tr, x_te, y_te + 1)
    with pytest.raises(DataError, match=r"test.npz \[y_test\]: label 6 is not one of the 6"):
        datasources.load_any(path)
    folder = synthetic.write_idx(tmp_path / "idx", x_tr, y_tr, x_te, y_te + 10)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: label 15"):
        datasources.load_any(folder)


def test_images_and_labels_of_different_lengths_name_the_files(tmp_path, data):
    x_tr, y_tr, x_te, y_te = data
    folder = synthetic.write_idx(tmp_path / "idx", x_tr, y_tr[:-3], x_te, y_te)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz and .*train-labels-idx1-"
                                        r"ubyte.gz: 120 images but 117 labels"):
        datasources.load_any(folder)
    path = synthetic.write_npz(tmp_path / "len.npz", x_tr, y_tr, x_te, y_te[:5])
    with pytest.raises(DataError, match=r"len.npz \[x_test\] and .*\[y_test\]: 60 images but 5"):
        datasources.load_any(path)


def test_other_bad_files_name_the_file(tmp_path, data):
    x_tr, y_tr, x_te, y_te = data
    folder = synthetic.write_idx(tmp_path / "idx", *data)
    (folder / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08")          # truncated
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: not an unsigned-byte IDX"):
        datasources.load_any(folder)
    (folder / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: missing"):
        datasources.load_any(folder)
    np.savez(tmp_path / "obj.npz", x_train=np.array([{"a": 1}], dtype=object), y_train=y_tr,
             x_test=x_te, y_test=y_te)
    with pytest.raises(DataError, match="obj.npz: cannot read"):
        datasources.load_any(tmp_path / "obj.npz")
    np.savez(tmp_path / "miss.npz", x_train=x_tr, y_train=y_tr)
    with pytest.raises(DataError, match=r"miss.npz: missing arrays \['x_test', 'y_test'\]"):
        datasources.load_any(tmp_path / "miss.npz")
    np.savez(tmp_path / "f.npz", x_train=x_tr.astype(np.float32), y_train=y_tr, x_test=x_te,
             y_test=y_te)
    with pytest.raises(DataError, match=r"f.npz \[x_train\]: expected uint8"):
        datasources.load_any(tmp_path / "f.npz")
    with pytest.raises(DataError, match="neither one of"):
        datasources.load_any(tmp_path / "nowhere")


# ------------------------------------------------------------------ networks adapt

def test_preset_networks_adapt_to_the_input_shape_and_classes():
    for dataset, preset in (("mnist", "report"), ("cifar10", "fair"), ("cifar10", "report")):
        for config in presets.runs(dataset, preset):
            for shape in ((1, 16, 16), (3, 24, 40)):
                adapted = presets.adapt(config, shape, 7, "mine")
                trainer = presets.build(adapted, 0)     # the C core accepts the sizes
                assert trainer.net.input_shape == shape and trainer.head.num_classes == 7
                emb = trainer.embed(np.zeros((2, *shape), np.uint8))
                assert emb.shape == (2, config.embedding_dim)
                assert adapted.name.startswith("mine-") and adapted.to_dict()["input_shape"] == \
                    list(shape)
    # the official shape gives the official network back
    for config in presets.runs("cifar10", "report"):
        assert presets.adapt(config, (3, 32, 32), 10).layers == config.layers


def test_sizes_the_pools_cannot_halve_are_refused_clearly():
    arcface = presets.runs("cifar10", "report")[0]       # three 2x2 pools
    with pytest.raises(ValueError, match=r"divisible by 8; the data's images are 28x28 "
                                         r"\(resize or crop them, e.g. to 24x24\)"):
        presets.adapt(arcface, (1, 28, 28), 10)
    data = datasets.Dataset(*synthetic.arrays(shape=(1, 10, 10)), classes=list("abcdef"),
                            name="tiny")
    with pytest.raises(ValueError, match="divisible by 4"):
        runs.configs(data, "report")                        # the MNIST report ArcFace: 2 pools
    assert [c.head for c in runs.configs(data, "fair")] == list(presets.HEADS)  # one pool: fine


# ------------------------------------------------------------------ end to end

@pytest.mark.slow
def test_reproduce_and_evaluate_on_an_idx_folder(tmp_path, data):
    folder = synthetic.write_idx(tmp_path / "digits", *data)
    out = tmp_path / "res"
    run = cli("reproduce", "--dataset", folder, "--preset", "fair", "--heads", "arcface,adaface",
              "--epochs", "1", "--out", out, "--no-progress", "--threads", "1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "digits"
    assert results["data"] == {"source": str(folder.resolve()),
                               "checksum": "not checked: user data"}
    run0 = results["runs"][0]
    assert run0["config"]["input_shape"] == [1, 16, 16] and run0["config"]["num_classes"] == 6
    assert run0["config"]["layers"][5:7] == [["flatten"], ["linear", 64 * 8 * 8, 256]]
    assert run0["config"]["report_accuracy"] is None
    for name in ("roc", "scores", "samples", "comparison"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "models").iterdir()) == [
        "digits-fair-adaface-seed0.ckpt", "digits-fair-arcface-seed0.ckpt"]
    ev = cli("evaluate", out, "--json", tmp_path / "ev.json", "--threads", "1", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert "| digits-fair-arcface | 0 | closed |" in ev.stdout and "MAP@R" in ev.stdout
    evaluated = {r["name"]: r["metrics"] for r in json.loads((tmp_path / "ev.json").read_text())
                 ["runs"]}
    for record in results["runs"]:
        got = dict(evaluated[record["name"]])
        assert got.pop("checkpoint").endswith(f"{record['name']}-seed0.ckpt")
        assert got == record["metrics"]                    # the same numbers, recomputed
        ret = record["metrics"]["retrieval"]
        assert f"| {100 * ret['precision_at_1']:.2f} | {100 * ret['map_at_r']:.2f} |" in ev.stdout
    # the same networks on another protocol and data set of the same shape
    npz = synthetic.write_npz(tmp_path / "other.npz", *synthetic.arrays(seed=5))
    ev = cli("evaluate", out / "models" / "digits-fair-arcface-seed0.ckpt", "--dataset", npz,
             "--protocol", "open", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert "| digits-fair-arcface | 0 | open |" in ev.stdout
    assert "Note: the network was" in ev.stdout
    bad = cli("evaluate", tmp_path / "nothing", cwd=tmp_path)
    assert bad.returncode == 1 and "no such folder or checkpoint" in bad.stderr


@pytest.mark.slow
def test_reproduce_on_an_image_folder_and_an_npz(tmp_path):
    x_tr, y_tr, x_te, y_te = synthetic.arrays(shape=(3, 16, 16), seed=1)
    folder = synthetic.write_image_folder(tmp_path / "pics", np.concatenate([x_tr, x_te]),
                                          np.concatenate([y_tr, y_te]))
    out = tmp_path / "res-img"
    run = cli("reproduce", "--dataset", folder, "--test-fraction", "0.25", "--preset", "fair",
              "--heads", "cosface", "--epochs", "1", "--out", out, "--no-progress",
              "--threads", "1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["test_fraction"] == 0.25
    config = results["runs"][0]["config"]
    assert config["input_shape"] == [3, 16, 16] and config["layers"][0] == ["conv", 3, 32]
    assert results["runs"][0]["metrics"]["num_test"] == 6 * round(0.25 * 30)   # per class
    plot = cli("plot", out, cwd=tmp_path)                   # redraws, the sample grid included
    assert plot.returncode == 0 and "samples.png" in plot.stdout, plot.stderr
    npz = synthetic.write_npz(tmp_path / "colour.npz", x_tr, y_tr, x_te, y_te)
    run = cli("reproduce", "--dataset", npz, "--preset", "paper", "--heads", "arcface",
              "--epochs", "1", "--out", tmp_path / "res-npz", "--no-progress", "--no-figures",
              "--threads", "1", "--protocol", "open", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    record = json.loads((tmp_path / "res-npz" / "results.json").read_text())["runs"][0]
    assert record["name"] == "colour-paper-arcface-open" and record["config"]["num_classes"] == 3
    bad = cli("reproduce", "--dataset", tmp_path / "missing.npz", "--preset", "fair", cwd=tmp_path)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    (tmp_path / "bad.npz").write_bytes(b"junk")
    bad = cli("reproduce", "--dataset", tmp_path / "bad.npz", "--out", tmp_path / "r3",
              cwd=tmp_path)
    assert bad.returncode == 1 and "bad.npz: cannot read" in bad.stderr
    assert not (tmp_path / "r3").exists()
