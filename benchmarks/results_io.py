"""Where the benchmarks write their results, and what machine they ran on."""
from __future__ import annotations

import platform
from pathlib import Path


def fresh_path(folder: Path, stem: str) -> Path:
    """folder/stem.json, or stem-2.json, stem-3.json, ... when taken: a new
    run never overwrites an earlier one."""
    path, n = folder / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.json"
    return path


def cpu_model() -> str:
    """The CPU's model name and its widest vector extension (AVX-512 or AVX2)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    return name + (" with AVX-512" if "avx512f" in flags else " with AVX2" if "avx2" in flags
                   else "")
