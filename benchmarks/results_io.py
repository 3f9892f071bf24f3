"""Where the benchmarks write their results, and what machine they ran on."""
from __future__ import annotations

import json
import platform
import re
from pathlib import Path

from adaloss.fileio import atomic_write


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


SPEED_DOC = Path(__file__).resolve().parents[1] / "docs" / "speed.md"


def block_re(tag: str) -> re.Pattern:
    """A generated block of a doc: ``<!-- TAG:FILE -->`` ... ``<!-- /TAG -->``,
    FILE naming the results file it is made from."""
    return re.compile(rf"(<!-- {tag}:(?P<file>[\w.\-]+) -->\n)(?P<body>.*?)(<!-- /{tag} -->)", re.S)


def fill_blocks(text: str, tag: str, render, results_dir: Path) -> str:
    """text with every TAG block remade by render(results as a dict)."""
    def one(m):
        path = results_dir / m["file"]
        if not path.exists():
            raise SystemExit(f"docs: a {tag} block names {m['file']}, which is not in "
                             f"{results_dir}")
        return m[1] + render(json.loads(path.read_text())) + "\n" + m[4]
    return block_re(tag).sub(one, text)


def write_doc(path: Path, text: str) -> None:
    """Replace a doc whole or not at all (unchanged text: not touched)."""
    if path.read_text(encoding="utf-8") != text:
        atomic_write(path, text.encode("utf-8"))
