"""Shared fixtures. PyTorch is a required test dependency: a missing torch is an
error, never a silent skip."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import adaloss
import prepare_data

ROOT = Path(__file__).resolve().parents[1]


def pytest_report_header(config):
    return f"adaloss {adaloss.__version__} from {Path(adaloss.__file__).parent}, " \
           f"{adaloss.get_num_threads()} threads"


@pytest.fixture(scope="session")
def torch():
    import torch as _torch  # ImportError here is a failure, on purpose

    _torch.set_num_threads(adaloss.get_num_threads())
    return _torch


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def threads():
    """Restore the thread count a test changes."""
    before = adaloss.get_num_threads()
    yield adaloss.set_num_threads
    adaloss.set_num_threads(before)


def data_root() -> Path | None:
    """The real data sets as a root load_mnist and load_cifar10 read directly:
    $ADALOSS_DATA or shared/data beside the project, prepared once by
    tests/prepare_data.py (CIFAR-10 converted from JPEG into a cache folder)."""
    source = prepare_data.find_source()
    if source is None or not (source / "mnist").is_dir():
        return None
    try:
        return prepare_data.prepare(source)
    except FileNotFoundError:   # MNIST only: the CIFAR-10 tests say what is missing
        return source


def pytest_configure(config):
    src = ROOT / "adaloss"
    if Path(adaloss.__file__).resolve().parent == src.resolve() and not list(src.glob("_core*")):
        raise pytest.UsageError("adaloss is imported from the source tree without its C "
                                "extension: run `pip install .` first")


_skipped = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    # in CI nothing may be skipped: a skip means a missing dependency or data set
    if os.environ.get("CI") and _skipped and session.exitstatus == 0:
        print(f"\nCI: {len(_skipped)} skipped tests count as failures: {_skipped[:5]}")
        session.exitstatus = 1


@pytest.fixture(scope="session")
def shared_data():
    """The real data sets; skipped outside CI when absent, a failure in CI."""
    root = data_root()
    if root is None or not (root / "mnist").is_dir():
        if os.environ.get("CI"):
            pytest.fail("real data sets not found: set ADALOSS_DATA or provide ../shared/data")
        pytest.skip("real data sets not found (set ADALOSS_DATA)")
    return root
