"""Loaders on small synthetic files in each official format, damaged files,
the offline error, and the real data sets."""
import gzip
import hashlib
import pickle

import numpy as np
import pytest

from adaloss import datasets
from adaloss.datasets import DataError


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder, n_train=20, n_test=10, gz=True, rng=None):
    rng = rng or np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    for name, arr in arrays.items():
        data = idx_bytes(arr)
        if gz:
            with gzip.open(folder / (name + ".gz"), "wb") as fh:
                fh.write(data)
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_roundtrip(tmp_path, gz):
    arrays = write_mnist(tmp_path / "mnist", gz=gz)
    data = datasets.load_mnist(tmp_path, download=False, verify=False)
    assert data.train_images.shape == (20, 1, 28, 28) and data.train_images.dtype == np.uint8
    np.testing.assert_array_equal(data.train_images[:, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert data.test_labels.dtype == np.int64


def test_mnist_checksum_mismatch_is_reported(tmp_path):
    write_mnist(tmp_path / "mnist")
    with pytest.raises(DataError, match="MD5"):
        datasets.load_mnist(tmp_path, download=False)   # verify=True: not the official files


def test_mnist_truncated_file(tmp_path):
    write_mnist(tmp_path / "mnist", gz=False)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated"):
        datasets.load_mnist(tmp_path, download=False, verify=False)


def test_mnist_corrupted_gzip_and_magic(tmp_path):
    write_mnist(tmp_path / "mnist")
    path = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(DataError, match="damaged"):
        datasets.load_mnist(tmp_path, download=False, verify=False)
    with gzip.open(path, "wb") as fh:
        fh.write(b"\x12\x34\x56\x78" + bytes(10))
    with pytest.raises(DataError, match="magic"):
        datasets.load_mnist(tmp_path, download=False, verify=False)


def test_offline_error_says_where_to_put_files(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(datasets.urllib.request, "urlopen", no_network)
    with pytest.raises(DataError) as err:
        datasets.load_mnist(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "mnist") in msg and "train-images-idx3-ubyte.gz" in msg
    assert "network unreachable" in msg
    with pytest.raises(DataError, match="cifar-10-batches-bin"):
        datasets.load_cifar10(tmp_path)
    with pytest.raises(DataError, match="download=False"):
        datasets.load_mnist(tmp_path, download=False)


def test_download_resumes_verifies_and_renames(tmp_path, monkeypatch):
    payload = bytes(range(256)) * 100

    class Response:
        def __init__(self, start):
            self.status = 206 if start else 200
            self.headers = {"Content-Length": str(len(payload) - start)}
            self._data = payload[start:]

        def read(self, n):
            chunk, self._data = self._data[:n], self._data[n:]
            return chunk

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    seen = []

    def fake_urlopen(request, timeout):
        rng = request.headers.get("Range")
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        seen.append(start)
        return Response(start)

    monkeypatch.setattr(datasets.urllib.request, "urlopen", fake_urlopen)
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(payload[:1000])   # an interrupted download
    datasets.download("http://x/file.bin", dest, hashlib.md5(payload).hexdigest(), progress=False)
    assert seen == [1000] and dest.read_bytes() == payload
    assert not (tmp_path / "file.bin.part").exists()
    with pytest.raises(DataError, match="MD5"):
        datasets.download("http://x/file.bin", tmp_path / "bad.bin", "0" * 32, progress=False)
    assert not (tmp_path / "bad.bin").exists() and not (tmp_path / "bad.bin.part").exists()


def write_cifar_bin(folder, rng):
    folder.mkdir(parents=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rec = rng.integers(0, 256, (10000, 3073), dtype=np.uint8)
        rec[:, 0] %= 10
        rec.tofile(folder / f"{name}.bin")
        out[name] = rec
    return out


def test_cifar_binary_version(tmp_path, rng):
    recs = write_cifar_bin(tmp_path / "cifar-10-batches-bin", rng)
    data = datasets.load_cifar10(tmp_path, download=False)
    assert data.train_images.shape == (50000, 3, 32, 32) and data.test_images.shape == (10000, 3, 32, 32)
    np.testing.assert_array_equal(data.test_images[5].reshape(-1), recs["test_batch"][5, 1:])
    np.testing.assert_array_equal(data.train_labels[10000:20000], recs["data_batch_2"][:, 0])
    assert data.classes[0] == "airplane" and data.classes[9] == "truck"


def test_cifar_binary_truncated(tmp_path, rng):
    write_cifar_bin(tmp_path / "cifar-10-batches-bin", rng)
    path = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-3073])
    with pytest.raises(DataError, match="truncated"):
        datasets.load_cifar10(tmp_path, download=False)


def test_cifar_binary_manifest_detects_corruption(tmp_path, rng):
    write_cifar_bin(tmp_path / "cifar-10-batches-bin", rng)
    folder = tmp_path / "cifar-10-batches-bin"
    lines = [f"{hashlib.md5((folder / f).read_bytes()).hexdigest()}  {f}"
             for f in sorted(p.name for p in folder.iterdir())]
    (folder / datasets.MANIFEST).write_text("\n".join(lines) + "\n")
    datasets.load_cifar10(tmp_path, download=False)
    raw = bytearray((folder / "test_batch.bin").read_bytes())
    raw[500] ^= 0xFF
    (folder / "test_batch.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="MD5"):
        datasets.load_cifar10(tmp_path, download=False)


def test_cifar_python_version(tmp_path, rng):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (10000, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, 10000).tolist()}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
        batches[name] = batch
    with pytest.raises(DataError, match="MD5"):   # not the official pickles
        datasets.load_cifar10(tmp_path, download=False)
    data = datasets.load_cifar10(tmp_path, download=False, verify=False)
    np.testing.assert_array_equal(data.test_images[3].reshape(-1), batches["test_batch"][b"data"][3])
    (folder / "data_batch_4").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a CIFAR-10"):
        datasets.load_cifar10(tmp_path, download=False, verify=False)


def test_image_folder(tmp_path, rng):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png")
    images, labels, classes = datasets.load_image_folder(tmp_path)
    assert images.shape == (6, 3, 8, 6) and classes == ["cat", "dog"]
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(DataError):
        datasets.load_image_folder(tmp_path / "cat")


def test_real_mnist(shared_data):
    data = datasets.load_mnist(shared_data, download=False)
    assert data.train_images.shape == (60000, 1, 28, 28) and data.test_images.shape == (10000, 1, 28, 28)
    assert np.bincount(data.train_labels).min() > 5000


@pytest.mark.slow
def test_real_cifar10(shared_data):
    data = datasets.load_cifar10(shared_data, download=False)
    assert data.train_images.shape == (50000, 3, 32, 32)
    assert np.bincount(data.test_labels).tolist() == [1000] * 10


def test_prepare_data_makes_a_root_from_a_read_only_shared_folder(tmp_path):
    import prepare_data

    shared, out = tmp_path / "shared", tmp_path / "cache" / "root"
    (shared / "mnist").mkdir(parents=True)
    (shared / prepare_data.ARCHIVE).write_bytes(b"")
    calls = tmp_path / "calls"
    # a stand-in for the folder's conversion script: writes the official layout
    (shared / prepare_data.SCRIPT).write_text(
        "import pathlib, sys\n"
        f"open({str(calls)!r}, 'a').write('x')\n"
        "out = pathlib.Path(sys.argv[1]) / 'cifar-10-batches-bin'\n"
        "out.mkdir(parents=True)\n"
        "for n in ['data_batch_%d' % i for i in range(1, 6)] + ['test_batch']:\n"
        "    (out / (n + '.bin')).write_bytes(b'')\n")
    before = sorted(p.name for p in shared.rglob("*"))
    shared.chmod(0o555)                      # as the CI copy: never written to
    try:
        root = prepare_data.prepare(shared, out)
        again = prepare_data.prepare(shared, out)
    finally:
        shared.chmod(0o755)
    assert sorted(p.name for p in shared.rglob("*")) == before   # (root may write anyway)
    assert root == again == out and calls.read_text() == "x"     # converted once
    assert (root / "mnist").resolve() == (shared / "mnist").resolve()
    assert (root / "cifar-10-batches-bin" / "test_batch.bin").exists()
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temporaries
    assert prepare_data.prepare(root) == root                   # a ready root is used as is
    with pytest.raises(FileNotFoundError, match="mnist"):
        prepare_data.prepare(tmp_path / "cache")
