"""Hostile and broken files: checkpoints and data sets that are well-formed on the
outside (valid checksum, valid gzip, valid pickle) but lie inside. Each must be
refused with a clear error naming the file, before any state changes, without
running foreign code, reading forever or allocating what the file claims.

Crashes, hangs and memory blow-ups are tested in a child process with a
timeout and an address-space limit."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

import adaloss
from adaloss import checkpoint
from adaloss.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


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
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


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
        from adaloss import checkpoint
        net = adaloss.Sequential([adaloss.Linear(8, 4)])
        head = adaloss.Softmax(3, 4)
        trainer = adaloss.Trainer(net, head, adaloss.Adam(net.parameters()))
        for folder in sys.argv[1:]:
            try:
                checkpoint.load_latest(folder, trainer)
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
