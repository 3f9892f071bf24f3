"""Hostile and broken files: checkpoints and data sets that are well-formed on the
outside (valid checksum, valid gzip, valid pickle) but lie inside. Each must be
refused with a clear error naming the file, before any state changes, without
running foreign code, reading forever or allocating what the file claims.

Crashes, hangs and memory blow-ups are tested in a child process with a
timeout and an address-space limit."""
from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import os
import pickle
import subprocess
import tempfile
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

import adaloss
from adaloss import checkpoint, datasets, training
from adaloss.checkpoint import CheckpointError
from adaloss.datasets import DataError



def run_child(code: str, *args, extra_mib: int = 160, timeout: float = 120) -> \
        subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter whose address space is limited to what
    it uses after importing adaloss plus `extra_mib`; a hang is killed by the
    timeout (and fails the test through subprocess.TimeoutExpired)."""
    prelude = textwrap.dedent(f"""
        import resource, sys
        import numpy as np
        import adaloss, adaloss.checkpoint, adaloss.datasets
        with open("/proc/self/status") as fh:
            vm = next(int(l.split()[1]) for l in fh if l.startswith("VmSize:")) * 1024
        limit = vm + {extra_mib} * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        """)
    # the child imports the adaloss this test imported (installed, or built in
    # place), never the source folder of the current directory
    env = dict(os.environ, PYTHONPATH=str(Path(adaloss.__file__).resolve().parents[1]),
               OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=tempfile.gettempdir())


# ================================================================= checkpoints

def small_trainer(seed: int) -> adaloss.Trainer:
    adaloss.manual_seed(seed)
    net = adaloss.Sequential([adaloss.Linear(8, 6), adaloss.ReLU(), adaloss.Linear(6, 4)])
    head = adaloss.AdaFace(num_classes=3, embedding_dim=4, s=8.0)
    opt = adaloss.Adam(net.parameters() + head.parameters(), lr=1e-2)
    trainer = adaloss.Trainer(net, head, opt)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        trainer.step(rng.normal(size=(16, 8)).astype(np.float32), rng.integers(0, 3, 16))
    return trainer


def snapshot(trainer: adaloss.Trainer) -> dict:
    opt = trainer.optimizer.state_dict()
    return {"net": trainer.net.state_dict(), "head": trainer.head.weight.copy(),
            "exp_avg": opt["exp_avg"], "exp_avg_sq": opt["exp_avg_sq"], "step": opt["step"],
            "lr": opt["lr"], "running": (trainer.head.running_mean, trainer.head.running_std)}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a["net"]:
        np.testing.assert_array_equal(a["net"][k], b["net"][k], err_msg=k)
    for k in ("head", "exp_avg", "exp_avg_sq"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert (a["step"], a["lr"], a["running"]) == (b["step"], b["lr"], b["running"])


def payload_of(path: Path) -> tuple[dict, dict]:
    """Our own (trusted) checkpoint's arrays and meta, for a test to tamper with."""
    with np.load(io.BytesIO(path.read_bytes()[checkpoint.HEADER:])) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return arrays, json.loads(arrays.pop("meta").tobytes().decode())


def seal(path: Path, payload: bytes) -> None:
    """Write a payload with a correct magic, version and checksum."""
    path.write_bytes(checkpoint.MAGIC + checkpoint.VERSION.to_bytes(4, "little")
                     + hashlib.sha256(payload).digest() + payload)


def rewrite(path: Path, arrays: dict, meta: dict) -> None:
    arrays = dict(arrays, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    seal(path, buf.getvalue())


def _set(meta, keys, value):
    for k in keys[:-1]:
        meta = meta[k]
    meta[keys[-1]] = value


def _del(meta, keys):
    for k in keys[:-1]:
        meta = meta[k]
    del meta[keys[-1]]


HALF_LOADED = {  # case: (change to arrays and meta, key the error must name)
    "head_shape": (lambda a, m: a.update({"head/weight": np.zeros((3, 5), np.float32)}),
                   "head/weight"),
    "head_nan": (lambda a, m: a["head/weight"].__setitem__((0, 0), np.nan), "head/weight"),
    "missing_array": (lambda a, m: a.pop("adam/exp_avg_sq"), "adam/exp_avg_sq"),
    "missing_meta": (lambda a, m: _del(m, ["optimizer", "lr"]), "lr"),
    "moments_str": (lambda a, m: a.update({"adam/exp_avg": a["adam/exp_avg"].astype(str)}),
                    "adam/exp_avg"),
    "step_negative": (lambda a, m: _set(m, ["optimizer", "step"], -1), "step"),
    "step_huge": (lambda a, m: _set(m, ["optimizer", "step"], 2 ** 70), "step"),
    "step_float": (lambda a, m: _set(m, ["optimizer", "step"], 3.5), "step"),
    "running_str": (lambda a, m: _set(m, ["running", "mean"], "big"), "running_mean"),
    "running_missing": (lambda a, m: m.update({"running": None}), "running"),
    "net_int": (lambda a, m: a.update({"net/0.bias": a["net/0.bias"].astype(np.int64)}),
                "net/0.bias"),
    "meta_list": (lambda a, m: m.update({"optimizer": [1, 2]}), "optimizer"),
    # item 6: what the constructors refuse
    "lr_nan": (lambda a, m: _set(m, ["optimizer", "lr"], float("nan")), "lr"),
    "lr_inf": (lambda a, m: _set(m, ["optimizer", "lr"], float("inf")), "lr"),
    "lr_negative": (lambda a, m: _set(m, ["optimizer", "lr"], -1.0), "lr"),
    "eps_negative": (lambda a, m: _set(m, ["optimizer", "eps"], -1.0), "eps"),
    "moment_negative": (lambda a, m: a["adam/exp_avg_sq"].__setitem__(0, -1.0), "exp_avg_sq"),
    "moment_nan": (lambda a, m: a["adam/exp_avg"].__setitem__(0, np.nan), "exp_avg"),
    "running_std_huge": (lambda a, m: _set(m, ["running", "std"], 1e300), "running_std"),
    "running_std_negative": (lambda a, m: _set(m, ["running", "std"], -1.0), "running_std"),
}


@pytest.mark.parametrize("case", sorted(HALF_LOADED))
def test_checkpoint_load_is_all_or_nothing(tmp_path, case):
    """Items 5 and 6: a valid checksum over bad contents raises CheckpointError
    naming the file and the key, and leaves net, head and optimizer untouched."""
    path = tmp_path / "hostile.ckpt"
    saved = small_trainer(1)
    checkpoint.save(path, saved.net, saved.head, saved.optimizer, epoch=1)
    change, key = HALF_LOADED[case]
    arrays, meta = payload_of(path)
    change(arrays, meta)
    rewrite(path, arrays, meta)
    target = small_trainer(2)
    before = snapshot(target)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path, target.net, target.head, target.optimizer)
    assert str(path) in str(err.value) and key in str(err.value), str(err.value)
    assert_same_state(before, snapshot(target))


def test_checkpoint_roundtrip_still_exact(tmp_path):
    path = tmp_path / "ok.ckpt"
    saved = small_trainer(1)
    checkpoint.save(path, saved.net, saved.head, saved.optimizer, epoch=4, note="x")
    target = small_trainer(2)
    assert checkpoint.load(path, target.net, target.head, target.optimizer) == \
        {"epoch": 4, "note": "x"}
    assert_same_state(snapshot(saved), snapshot(target))


@pytest.mark.parametrize("extra", [{"epoch": 1, "rng": "garbage", "history": {}},
                                   {"rng": None, "history": {}},
                                   {"epoch": -3, "rng": None, "history": {}},
                                   {"epoch": 1, "rng": None, "history": [1]}])
def test_load_latest_checks_its_extra_before_copying(tmp_path, extra):
    """fit(checkpoint_dir=...) resumes through load_latest: an epoch, RNG state or
    history it cannot use is refused before the weights are overwritten."""
    saved = small_trainer(1)
    rng_state = np.random.default_rng(0).bit_generator.state
    extra = {k: (rng_state if v is None else v) for k, v in extra.items()}
    checkpoint.save(tmp_path / checkpoint.LATEST, saved.net, saved.head, saved.optimizer,
                    **extra)
    target = small_trainer(2)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="extra"):
        training.load_latest(tmp_path, target)
    assert_same_state(before, snapshot(target))


def add_member(path: Path, name: str, size: int, compress=zipfile.ZIP_DEFLATED) -> None:
    """Append a member of `size` zero bytes to a checkpoint and re-seal it."""
    buf = io.BytesIO(path.read_bytes()[checkpoint.HEADER:])
    with zipfile.ZipFile(buf, "a") as zf:
        info = zipfile.ZipInfo(name)
        info.compress_type = compress
        with zf.open(info, "w", force_zip64=True) as fh:
            chunk = bytes(1 << 20)
            for _ in range(size >> 20):
                fh.write(chunk)
    seal(path, buf.getvalue())


def test_checkpoint_decompression_bomb_is_refused_before_reading(tmp_path):
    """Item 7: one extra deflated member of 256 MiB (a small file) is refused by
    name from the member list, in a child process with 160 MiB to spare."""
    path = tmp_path / "bomb.ckpt"
    saved = small_trainer(1)
    checkpoint.save(path, saved.net, saved.head, saved.optimizer)
    add_member(path, "junk.npy", 256 << 20)
    assert path.stat().st_size < 1 << 20
    proc = run_child("""
        import adaloss
        from adaloss import checkpoint
        net = adaloss.Sequential([adaloss.Linear(8, 6), adaloss.ReLU(), adaloss.Linear(6, 4)])
        head = adaloss.AdaFace(num_classes=3, embedding_dim=4, s=8.0)
        opt = adaloss.Adam(net.parameters() + head.parameters(), lr=1e-2)
        try:
            checkpoint.load(sys.argv[1], net, head, opt)
        except checkpoint.CheckpointError as exc:
            print("REFUSED", exc)
        else:
            print("LOADED")
        """, path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED" in proc.stdout and "junk.npy" in proc.stdout, proc.stdout


@pytest.mark.parametrize("member", ["net/0.weight.npy", "meta.npy"])
def test_checkpoint_member_larger_than_declared_shape_is_refused(tmp_path, member):
    """Item 7: a known member replaced by a deflated one whose npy header declares
    a huge shape is refused from its header, before its data is read."""
    path = tmp_path / "big.ckpt"
    saved = small_trainer(1)
    checkpoint.save(path, saved.net, saved.head, saved.optimizer)
    src = zipfile.ZipFile(io.BytesIO(path.read_bytes()[checkpoint.HEADER:]))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for info in src.infolist():
            if info.filename != member:
                zf.writestr(info, src.read(info.filename))
                continue
        head = io.BytesIO()
        dtype = np.uint8 if member == "meta.npy" else np.float32
        np.lib.format.write_array_header_1_0(
            head, {"descr": np.dtype(dtype).str, "fortran_order": False,
                   "shape": (1 << 26,)})
        info = zipfile.ZipInfo(member)
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as fh:
            fh.write(head.getvalue())
            for _ in range((np.dtype(dtype).itemsize << 26) >> 20):
                fh.write(bytes(1 << 20))
    seal(path, buf.getvalue())
    target = small_trainer(2)
    with pytest.raises(CheckpointError, match=member.split("/")[0]):
        checkpoint.load(path, target.net, target.head, target.optimizer)


def test_checkpoint_latest_pointing_at_a_device_or_fifo_is_refused(tmp_path):
    """Weak case: latest.ckpt -> /dev/zero or a FIFO with no writer must not read
    (or block) forever."""
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / checkpoint.LATEST).symlink_to("/dev/zero")
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / checkpoint.LATEST)
    proc = run_child("""
        import adaloss
        from adaloss import checkpoint, training
        net = adaloss.Sequential([adaloss.Linear(8, 4)])
        head = adaloss.Softmax(3, 4)
        trainer = adaloss.Trainer(net, head, adaloss.Adam(net.parameters()))
        for folder in sys.argv[1:]:
            try:
                training.load_latest(folder, trainer)
            except checkpoint.CheckpointError as exc:
                print("REFUSED", exc)
        """, tmp_path / "zero", tmp_path / "fifo", timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(l.startswith("REFUSED") and "regular file" in l
                                   for l in lines), proc.stdout


def test_checkpoint_save_removes_stale_temporary_files(tmp_path):
    """Weak case: a save killed with SIGKILL leaves `.latest.ckpt.XXXX.tmp`; the
    next save of the same checkpoint removes such files once they are stale (not
    written for a minute), and leaves other files alone."""
    trainer = small_trainer(1)
    path = tmp_path / checkpoint.LATEST
    proc = run_child("""
        import os, signal
        import adaloss
        from adaloss import checkpoint
        net = adaloss.Sequential([adaloss.Linear(8, 4)])
        head = adaloss.Softmax(3, 4)
        opt = adaloss.Adam(net.parameters())
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)   # die mid-save
        checkpoint.save(sys.argv[1], net, head, opt)
        """, path, extra_mib=400)
    assert proc.returncode == -9
    stale = [p for p in tmp_path.iterdir()]
    assert len(stale) == 1 and stale[0].name.startswith(".latest.ckpt.") and \
        stale[0].name.endswith(".tmp")
    fresh = tmp_path / ".latest.ckpt.abcd1234.tmp"      # maybe another save in flight
    fresh.write_bytes(b"x")
    other = tmp_path / ".other.ckpt.abcd1234.tmp"
    other.write_bytes(b"x")
    os.utime(stale[0], (0, 0))
    os.utime(other, (0, 0))
    checkpoint.save(path, trainer.net, trainer.head, trainer.optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [checkpoint.LATEST, fresh.name, other.name])


def test_load_state_dict_refuses_values_that_overflow_float32():
    net = adaloss.Sequential([adaloss.Linear(3, 2)])
    before = net.state_dict()
    state = {k: v.astype(np.float64) for k, v in before.items()}
    state["0.bias"][1] = 1e39
    with pytest.raises(ValueError, match=r"0\.bias.*float32"):
        net.load_state_dict(state)
    for k, v in before.items():
        np.testing.assert_array_equal(net.state_dict()[k], v)
    head = adaloss.ArcFace(3, 2)
    with pytest.raises(ValueError, match="weight.*float32"):
        head.weight = np.full((3, 2), -1e39)


def test_pickle_and_deepcopy_of_adaloss_objects():
    """Weak case: pickle and copy.deepcopy work for Sequential, heads and Trainer
    (built on state_dict and spec), and the copy trains on its own."""
    trainer = small_trainer(1)
    x = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    y = np.arange(16) % 3
    for clone_of in (copy.deepcopy, lambda obj: pickle.loads(pickle.dumps(obj))):
        clone = clone_of(trainer)
        assert_same_state(snapshot(trainer), snapshot(clone))
        assert clone.head_trained == trainer.head_trained
        np.testing.assert_array_equal(clone.net.forward(x), trainer.net.forward(x))
        before = snapshot(trainer)
        loss_clone = clone.step(x, y)
        assert_same_state(before, snapshot(trainer))          # the original is untouched
        loss = trainer.step(x, y)
        assert loss == loss_clone                             # same state, same step
        assert_same_state(snapshot(trainer), snapshot(clone))
    for head in (adaloss.Softmax(3, 4), adaloss.CosFace(3, 4, s=5.0, m=0.2),
                 adaloss.ArcFace(3, 4, variant="report"), adaloss.AdaFace(3, 4, h=0.5)):
        clone = pickle.loads(pickle.dumps(head))
        assert repr(clone) == repr(head) and type(clone) is type(head)
        np.testing.assert_array_equal(clone.weight, head.weight)
    net = copy.deepcopy(trainer.net)
    assert net.state_dict().keys() == trainer.net.state_dict().keys()
    with pytest.raises(TypeError, match="Trainer|checkpoint"):
        pickle.dumps(trainer.optimizer)


# ================================================================= data sets

MNIST_TRAIN_IMAGES = "train-images-idx3-ubyte"


def test_mnist_gzip_bomb_is_stopped_at_the_known_size(tmp_path):
    """Item 8: a 0.25 MiB .gz that inflates to 520 MiB, under a memory limit,
    gives a DataError naming the file (verify=True stops at the official size,
    verify=False at the size the header declares)."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    bomb = folder / (MNIST_TRAIN_IMAGES + ".gz")
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (60000, 28, 28))
    with gzip.open(bomb, "wb", compresslevel=9) as fh:
        fh.write(header)
        for _ in range(520):
            fh.write(bytes(1 << 20))
    assert bomb.stat().st_size < 1 << 20
    proc = run_child("""
        from adaloss import datasets
        for verify in (True, False):
            try:
                datasets.load_mnist(sys.argv[1], download=False, verify=verify)
            except datasets.DataError as exc:
                print("REFUSED", exc)
        """, tmp_path, extra_mib=200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(l.startswith("REFUSED") and str(bomb) in l for l in lines), \
        proc.stdout


def test_mnist_header_declaring_a_huge_size_is_refused(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    path = folder / MNIST_TRAIN_IMAGES
    path.write_bytes(bytes([0, 0, 8, 3]) + b"".join(
        d.to_bytes(4, "big") for d in (2 ** 31, 28, 28)) + bytes(100))
    with pytest.raises(DataError, match=MNIST_TRAIN_IMAGES):
        datasets.load_mnist(tmp_path, download=False, verify=False)


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_cifar_python_batch_never_runs_pickled_code(tmp_path):
    """Item 9: a hostile python batch whose payload creates a file is refused,
    even with verify=False, and the file is not created; the message does not
    recommend verify=False."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    victim = tmp_path / "pwned"
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (10000, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, 10000).tolist()}
        if name == "data_batch_2":
            batch[b"extra"] = _Payload(str(victim))
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    with pytest.raises(DataError) as err:
        datasets.load_cifar10(tmp_path, download=False)
    assert "verify=False" not in str(err.value) and "MD5" in str(err.value)
    with pytest.raises(DataError, match="data_batch_2.*(forbidden|not allowed)"):
        datasets.load_cifar10(tmp_path, download=False, verify=False)
    assert not victim.exists()


def test_cifar_python_batch_in_the_official_layout_still_loads(tmp_path):
    """The restricted unpickler accepts what the official (Python 2) batches hold:
    a dict of byte-string keys, a uint8 array built by numpy.core.multiarray.
    _reconstruct, labels and file names."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    expected = {}
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (10000, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 10000).tolist()
        batch = {b"batch_label": b"training batch", b"data": data, b"labels": labels,
                 b"filenames": [b"x.png"] * 3}
        raw = pickle.dumps(batch, protocol=(2, 4, 5, 2, 4, 5)[i])
        # the official files were written by Python 2 with NumPy 1.x: protocol 2,
        # whose GLOBAL opcode names numpy.core (only protocol 2 has that opcode)
        raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        (folder / name).write_bytes(raw)
        expected[name] = (data, labels)
    data = datasets.load_cifar10(tmp_path, download=False, verify=False)
    np.testing.assert_array_equal(data.test_images.reshape(10000, -1), expected["test_batch"][0])
    np.testing.assert_array_equal(data.train_labels[:10000], expected["data_batch_1"][1])


def save_png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


def test_image_folder_16_bit_png_is_rescaled(tmp_path):
    """Item 10: a 16-bit grayscale PNG keeps its contrast (>> 8), one channel."""
    (tmp_path / "a").mkdir()
    pixels = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1365)
    save_png(tmp_path / "a" / "0.png", pixels)
    images, labels, _ = datasets.load_image_folder(tmp_path)
    assert images.shape == (1, 1, 6, 8)
    np.testing.assert_array_equal(images[0, 0], (pixels >> 8).astype(np.uint8))
    images, _, _ = datasets.load_image_folder(tmp_path, grayscale=False)
    assert images.shape == (1, 3, 6, 8)
    np.testing.assert_array_equal(images[0, 2], (pixels >> 8).astype(np.uint8))


def test_image_folder_errors_name_the_file_and_what_was_expected(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    rng = np.random.default_rng(0)
    save_png(tmp_path / "a" / "0.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    save_png(tmp_path / "a" / "1.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    with pytest.raises(DataError) as err:      # gray among RGB: channels, not size
        datasets.load_image_folder(tmp_path)
    assert "1.png" in str(err.value) and "grayscale=" in str(err.value)
    assert "size=" not in str(err.value)
    (tmp_path / "a" / "1.png").unlink()
    save_png(tmp_path / "a" / "2.png", rng.integers(0, 256, (9, 8, 3), dtype=np.uint8))
    with pytest.raises(DataError, match=r"2\.png.*size="):
        datasets.load_image_folder(tmp_path)
    (tmp_path / "a" / "2.png").unlink()
    raw = (tmp_path / "a" / "0.png").read_bytes()
    (tmp_path / "a" / "3.png").write_bytes(raw[:len(raw) // 2])     # truncated
    with pytest.raises(DataError, match=r"3\.png"):
        datasets.load_image_folder(tmp_path)
    (tmp_path / "a" / "3.png").unlink()
    Image.new("L", (3000, 3000)).save(tmp_path / "a" / "4.png")
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1000
    try:
        with pytest.raises(DataError, match=r"4\.png.*pixels"):
            datasets.load_image_folder(tmp_path)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_download_timeout_is_short_and_each_mirror_is_named(tmp_path, monkeypatch, capsys):
    """Weak case: an unresponsive network; each mirror is announced and tried
    with a short (connect) timeout, then the clear offline error."""
    import socket

    seen = []

    def silent(request, timeout):
        seen.append((request.full_url, timeout))
        raise socket.timeout("timed out")

    monkeypatch.setattr(datasets.urllib.request, "urlopen", silent)
    with pytest.raises(DataError, match="could not be downloaded"):
        datasets.load_mnist(tmp_path)
    assert len(seen) == len(datasets.MNIST_MIRRORS)
    assert all(timeout <= 10 for _, timeout in seen)
    err = capsys.readouterr().err
    assert all(m in err for m in datasets.MNIST_MIRRORS)
