"""The README's Python quick start runs as written, and prints the same
five finite losses every time (it is seeded)."""
from __future__ import annotations

import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_python_quick_start_runs_the_same_every_time():
    blocks = re.findall(r"## Quick start: Python\n.*?```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1, "README.md: expected one Python block under 'Quick start: Python'"
    outputs = []
    for _ in range(2):
        # outside the project folder, so that the installed (or built) package is imported
        proc = subprocess.run([sys.executable, "-c", blocks[0]], capture_output=True, text=True,
                              timeout=300, cwd=tempfile.gettempdir())
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs.append(proc.stdout)
    losses = [float(v) for v in re.findall(r"-?\d+\.\d+|nan|inf", outputs[0].splitlines()[-1])]
    assert len(losses) == 5 and all(math.isfinite(v) and v > 0 for v in losses), outputs[0]
    assert outputs[0] == outputs[1]
