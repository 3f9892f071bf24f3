"""adaloss: angular-margin losses and small CNNs trained on the CPU by a C core.

    import adaloss
    net = adaloss.Sequential([...]); head = adaloss.ArcFace(10, 128)
    opt = adaloss.Adam(net.parameters() + head.parameters())
    trainer = adaloss.Trainer(net, head, opt); loss = trainer.step(x, labels)
"""
from __future__ import annotations

import ctypes
import importlib
import os

from ._version import __version__


def _preload_openblas() -> None:
    """Load the scipy-openblas32 library before the extension, so the extension
    finds it whatever the site-packages layout (its rpath covers the usual one)."""
    try:
        import scipy_openblas32
    except ImportError:  # built against a system OpenBLAS
        return
    path = os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(True))
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


_preload_openblas()

from . import _core  # noqa: E402
from ._core import NonFiniteError  # noqa: E402
from .nn import (  # noqa: E402
    AdaFace,
    Adam,
    ArcFace,
    CombinedMargin,
    Conv2d,
    CosFace,
    Flatten,
    L2Normalize,
    Linear,
    MaxPool2d,
    Parameter,
    ReLU,
    Sequential,
    Softmax,
    Trainer,
    manual_seed,
)


def set_num_threads(num_threads: int) -> None:
    """Number of threads the C core uses (default: the machine's cores), 1 to
    ``adaloss._core.MAX_THREADS``. A call already running keeps the count it
    started with. In a process forked after the core ran threads (OpenMP's
    thread pool does not survive fork) the count is 1 and more raises
    RuntimeError: start such workers with the 'spawn' or 'forkserver' method."""
    if not isinstance(num_threads, int) or isinstance(num_threads, bool):
        raise TypeError(f"num_threads: expected an int, got {type(num_threads).__name__}")
    _core.set_num_threads(num_threads)


def get_num_threads() -> int:
    """Number of threads the C core uses."""
    return _core.get_num_threads()


_SUBMODULES = {"checkpoint", "cli", "datasets", "fileio", "metrics", "plots", "presets", "runs", "stats",
               "study", "training"}


def __getattr__(name: str):
    # the heavier submodules load on first use, so `import adaloss` stays fast
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in {"fit", "evaluate", "predict", "History"}:
        return getattr(importlib.import_module(".training", __name__), name)
    if name in {"save", "load"}:
        return getattr(importlib.import_module(".checkpoint", __name__), name)
    raise AttributeError(f"module 'adaloss' has no attribute {name!r}")


__all__ = [
    "AdaFace", "Adam", "ArcFace", "CombinedMargin", "Conv2d", "CosFace", "Flatten", "L2Normalize", "Linear",
    "MaxPool2d", "NonFiniteError", "Parameter", "ReLU", "Sequential", "Softmax", "Trainer",
    "get_num_threads", "manual_seed", "set_num_threads", "__version__",
]
