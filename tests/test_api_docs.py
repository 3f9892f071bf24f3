"""The API reference builds from the docstrings with pdoc, without a warning.

pdoc reports what it cannot document (a submodule that fails to import, an
annotation it cannot evaluate, a docstring it cannot render) as Python
warnings; here they are errors. The build runs in a subprocess so pdoc's
imports and global render settings stay out of the test process."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow   # pdoc renders every module in a subprocess (~10 s)

pytest.importorskip("pdoc")

BUILD = r"""
import pkgutil, sys, warnings
from pathlib import Path
warnings.simplefilter("error")
import pdoc
import adaloss
modules = ["adaloss"] + sorted("adaloss." + m.name for m in pkgutil.iter_modules(adaloss.__path__)
                               if not m.name.startswith("_"))
pdoc.pdoc(*modules, output_directory=Path(sys.argv[1]))
print(" ".join(modules))
"""


def build(out: Path, code: str = BUILD) -> subprocess.CompletedProcess:
    # run outside the source tree: an installed adaloss, not the unbuilt adaloss/ folder
    return subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                          cwd=out.parent, timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("api")
    proc = build(out)
    assert proc.returncode == 0, f"pdoc failed or warned:\n{proc.stderr[-4000:]}"
    return out, proc.stdout.split()


def test_every_public_module_has_a_page(reference):
    out, modules = reference
    assert {"adaloss", "adaloss.nn", "adaloss.training", "adaloss.datasets"} <= set(modules)
    for name in modules:
        page = out / (name.replace(".", "/") + ".html")
        assert page.is_file(), f"no page for {name}"
    assert (out / "index.html").is_file() and (out / "search.js").is_file()


@pytest.mark.parametrize("page, names", [
    ("adaloss.html", ["Sequential", "ArcFace", "AdaFace", "CosFace", "Softmax", "Trainer", "Adam"]),
    ("adaloss/nn.html", ["Sequential", "ArcFace", "Trainer", "state_dict", "load_state_dict"]),
    ("adaloss/training.html", ["fit", "evaluate", "History"]),
    ("adaloss/datasets.html", ["load_mnist", "load_cifar10", "default_root", "DataError"]),
])
def test_pages_document_the_main_names(reference, page, names):
    out, _ = reference
    html = (out / page).read_text(encoding="utf-8")
    for name in names:
        assert f'id="{name}"' in html or f">{name}<" in html, f"{page} does not document {name}"


def test_module_docstrings_are_rendered(reference):
    out, _ = reference
    assert "$ADALOSS_DATA" in (out / "adaloss" / "datasets.html").read_text(encoding="utf-8")
    assert "Trainer(net, head, opt)" in (out / "adaloss.html").read_text(encoding="utf-8")


def test_a_warning_fails_the_build(tmp_path):
    # the same build, with a module that warns while pdoc documents it
    (tmp_path / "warns.py").write_text('"""A module."""\nimport warnings\n'
                                       'warnings.warn("undocumentable")\n')
    code = BUILD.replace('import adaloss\n', 'import adaloss\nsys.path.insert(0, sys.argv[2])\n')
    code = code.replace('pdoc.pdoc(*modules,', 'pdoc.pdoc(*modules, "warns",')
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out"), str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode != 0
    assert "undocumentable" in proc.stderr
