"""docs/findings.md (and the README's headline table) against the study.

The prose is hand-written; its tables must be what benchmarks/findings_tables.py
makes from benchmarks/study/summary.json, and every annotated number must be
the study's value at the precision written. The last tests show the check
fails on a perturbed summary and on a perturbed text."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from reference import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
FINDINGS = ROOT / "docs" / "findings.md"
STUDY = ROOT / "benchmarks" / "study"


@pytest.fixture(scope="module")
def ft():
    return benchmark_module("findings_tables")


@pytest.fixture(scope="module")
def summary():
    return json.loads((STUDY / "summary.json").read_text())


def _copy_study(tmp_path: Path, summary: dict) -> Path:
    """A study folder with this summary and links to the committed run records."""
    study = tmp_path / "study"
    study.mkdir(parents=True)
    (study / "summary.json").write_text(json.dumps(summary))
    (study / "runs").symlink_to(STUDY / "runs")
    (study / "extra").symlink_to(STUDY / "extra")
    return study


def test_docs_hold_the_studys_tables_and_numbers(ft):
    problems = ft.check()
    assert problems == [], ("docs differ from benchmarks/study/summary.json "
                            "(python benchmarks/findings_tables.py --write, then fix the "
                            "sentences listed):\n" + "\n".join(problems))


@pytest.fixture(scope="module")
def open_summary():
    return json.loads((ROOT / "benchmarks" / "study-open" / "summary.json").read_text())


def test_findings_tables_are_the_generated_ones(ft, summary, open_summary):
    text = FINDINGS.read_text(encoding="utf-8")
    tables = {m["name"]: m["body"] for m in ft.TABLE_RE.finditer(text)}
    grid = {"cells-mnist", "pairs-mnist", "cells-cifar10", "pairs-cifar10", "open-cells",
            "open-pairs"}
    assert grid <= set(tables) <= grid | {"remedies-cifar10"}
    for name, body in tables.items():
        source = open_summary if name.startswith("open-") else summary
        assert body == ft.table(source, name) + "\n", name
    # every cell and pair of the grid's heads is in one of the grid's tables,
    # every other cell (the remedies) in the remedies table
    in_grid = [c for c in summary["cells"] if c["head"] in ft.HEADS]
    pairs = [p for p in summary["pairs"] if p["a"] in ft.HEADS and p["b"] in ft.HEADS]
    rows = lambda kind: sum(body.count("\n") - 2 for name, body in tables.items()  # noqa: E731
                            if name.startswith(kind))
    assert (rows("cells-"), rows("pairs-")) == (len(in_grid), len(pairs))
    others = [c for c in summary["cells"] if c["head"] not in ft.HEADS]
    if others:
        remedies = tables["remedies-cifar10"]
        assert all(f"| {ft.REMEDIES.get(c['head'], c['head'])} |" in remedies for c in others)


def test_readme_headline_table_is_generated(ft, summary):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    tables = {m["name"]: m["body"] for m in ft.TABLE_RE.finditer(text)}
    assert tables == {"headline": ft.table(summary, "headline") + "\n"}


def test_docs_send_users_to_their_own_data(ft):
    # users have no shared folder beside the project: data is $ADALOSS_DATA or the cache
    for path in ft.doc_files():
        assert "../shared" not in path.read_text(encoding="utf-8"), path


def test_the_prose_cites_many_checked_numbers(ft):
    text = FINDINGS.read_text(encoding="utf-8")
    assert ft.annotated_count(text) >= 100
    # the judgement words follow the intervals: a pair whose CI holds 0 is a tie
    assert "cannot be told apart" in text


def test_pair_orientation(ft, summary):
    p = ft.oriented_pair(summary, "cifar10", "fair", "adaface", "arcface")
    q = ft.oriented_pair(summary, "cifar10", "fair", "arcface", "adaface")
    assert q["mean_diff"] == -p["mean_diff"]
    assert q["ci95"] == [-p["ci95"][1], -p["ci95"][0]]
    assert q["diffs"] == [-d for d in p["diffs"]]
    with pytest.raises(ft.FindingsError, match="no adaface − cosface pair"):
        ft.oriented_pair(summary, "cifar10", "paper", "adaface", "cosface")


def test_a_perturbed_summary_is_caught(ft, summary, tmp_path):
    changed = json.loads(json.dumps(summary))
    for p in changed["pairs"]:
        if (p["dataset"], p["preset"], p["a"], p["b"]) == ("cifar10", "fair", "adaface", "softmax"):
            p["mean_diff"] += 0.05
    study = _copy_study(tmp_path, changed)
    problems = ft.check(files=[FINDINGS], study_dir=study)
    assert any("table pairs-cifar10 differs" in p for p in problems), problems
    assert any("+2.44 written, the study says 2.49" in p for p in problems), problems
    # the unchanged summary, copied the same way, passes
    assert ft.check(files=[FINDINGS], study_dir=_copy_study(tmp_path / "same", summary)) == []


def test_a_perturbed_cell_mean_is_caught_at_the_precision_written(ft, summary, tmp_path):
    changed = json.loads(json.dumps(summary))
    for c in changed["cells"]:
        if (c["dataset"], c["preset"], c["head"]) == ("mnist", "report", "arcface"):
            c["margin_free_mean"] += 0.006     # 98.988 -> 98.994: still "98.99"
    study = _copy_study(tmp_path / "a", changed)
    numbers = [p for p in ft.check(files=[FINDINGS], study_dir=study) if "written" in p]
    assert numbers == []
    for c in changed["cells"]:
        if (c["dataset"], c["preset"], c["head"]) == ("mnist", "report", "arcface"):
            c["margin_free_mean"] += 0.004     # 98.998: now "99.00"
    study = _copy_study(tmp_path / "b", changed)
    numbers = [p for p in ft.check(files=[FINDINGS], study_dir=study) if "written" in p]
    assert numbers and all("98.99 written, the study says 99.00" in p for p in numbers), numbers


def test_a_perturbed_text_is_caught(ft, tmp_path):
    text = FINDINGS.read_text(encoding="utf-8")
    needle = "+5.51<!-- pair: cifar10 fair adaface arcface mean_diff -->"
    assert needle in text
    for wrong, message in [
        (needle.replace("+5.51", "+5.52"), "+5.52 written, the study says 5.51"),
        (needle.replace("+5.51", "-5.51"), "-5.51 written, the study says 5.51"),
        (needle.replace("arcface mean_diff", "arcface mean"), "no field 'mean'"),
        (needle.replace("cifar10 fair", "cifar10 nice"), "no adaface − arcface pair"),
        (needle.replace("+5.51", "about "), "does not follow a number"),
    ]:
        path = tmp_path / "findings.md"
        path.write_text(text.replace(needle, wrong, 1), encoding="utf-8")
        problems = ft.check(files=[path])
        assert any(message in p for p in problems), (wrong, problems)


def test_a_stale_table_is_rewritten(ft, summary, open_summary):
    text = FINDINGS.read_text(encoding="utf-8")
    stale = text.replace("| fair | AdaFace − softmax | 3 | +2.44 |",
                         "| fair | AdaFace − softmax | 3 | +2.40 |")
    assert stale != text
    assert ft.fill_tables(stale, summary, open_summary) == text


def test_run_and_diff_annotations(ft):
    study = ft.load_study()
    record = json.loads((STUDY / "runs" / "cifar10-fair-arcface-seed0.json").read_text())
    peak = ft.lookup(study, "run", "cifar10-fair-arcface-seed0 peak_accuracy")
    assert peak == pytest.approx(100 * max(record["history"]["test_accuracy"]))
    share = ft.lookup(study, "run", "cifar10-fair-arcface-seed0 theta_share_0")
    assert share == pytest.approx(100.0)
    diff = ft.lookup(study, "diff", "cell mnist report adaface report | "
                                    "cell mnist report arcface report")
    assert diff == pytest.approx(99.11 - 97.86)
    with pytest.raises(ft.FindingsError, match="expected 'KIND ARGS | KIND ARGS'"):
        ft.lookup(study, "diff", "cell mnist report adaface report")
    with pytest.raises(ft.FindingsError, match="bin edges"):
        ft.lookup(study, "run", "cifar10-fair-arcface-seed0 theta_share_141")
    with pytest.raises(ft.FindingsError, match="does not exist"):
        ft.lookup(study, "run", "mnist-fair-arcface-seed9 peak_accuracy")


def test_write_is_atomic_and_leaves_no_temporary_file(ft, tmp_path):
    path = tmp_path / "doc.md"
    path.write_text("old")
    ft._write_atomic(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["doc.md"]



def _open_summary() -> dict:
    """A small open-protocol summary: two heads, two seeds."""
    def cell(head, base):
        metrics = {name: {"n": 2, "mean": base + k, "std": 0.5, "ci95": [base + k - 3, base + k + 3],
                          "values": [base + k - 0.25, base + k + 0.25]}
                   for k, name in enumerate(("map_at_r", "precision_at_1", "tar_at_far_1e-3",
                                             "roc_auc", "open_set_auroc", "trapped"))}
        return {"dataset": "mnist", "preset": "fair", "head": head, "n": 2, "seeds": [0, 1],
                "mean": 99.0, "std": 0.1, "ci95": [98.1, 99.9], "accuracies": [98.9, 99.1],
                "metrics": metrics}
    pair = {"dataset": "mnist", "preset": "fair", "a": "arcface-open", "b": "softmax-open",
            "metric": "map_at_r", "n": 2, "mean_diff": 4.25, "ci95": [-2.0, 10.5],
            "wilcoxon_p": 0.5, "seeds": [0, 1], "diffs": [4.0, 4.5]}
    return {"cells": [cell("softmax-open", 30.0), cell("arcface-open", 34.25)], "pairs": [],
            "metric_pairs": [pair], "runs": 4}


def test_the_open_studys_tables_and_numbers_are_checked(ft, tmp_path):
    summary = _open_summary()
    study = tmp_path / "study-open"
    study.mkdir()
    (study / "summary.json").write_text(json.dumps(summary))
    doc = tmp_path / "open.md"
    text = ("<!-- table:open-cells -->\n<!-- /table -->\n<!-- table:open-pairs -->\n"
            "<!-- /table -->\nArcFace − softmax: "
            "+4.25<!-- mpair@study-open: mnist fair arcface-open softmax-open map_at_r mean_diff -->"
            ", softmax − ArcFace −4.25<!-- mpair@study-open: mnist fair softmax-open "
            "arcface-open map_at_r mean_diff -->, MAP@R "
            "34.2<!-- cell@study-open: mnist fair arcface-open metrics.map_at_r.mean -->.\n")
    doc.write_text(ft.fill_tables(text, {}, summary))
    assert "| MNIST | ArcFace | 2 | 99.00 ± 0.10 | 34.25 ± 0.50 |" in doc.read_text()
    assert "| MNIST | ArcFace − softmax | MAP@R | 2 | +4.25 | [-2.00, +10.50] | 0.500 |" \
        in doc.read_text()
    assert ft.check(files=[doc], open_dir=study) == []
    # a changed summary is caught: the tables and each annotated number
    summary["metric_pairs"][0]["mean_diff"] = 4.3
    summary["cells"][1]["metrics"]["map_at_r"]["mean"] = 34.36
    (study / "summary.json").write_text(json.dumps(summary))
    problems = ft.check(files=[doc], open_dir=study)
    assert any("table open-cells differs" in p for p in problems), problems
    assert any("table open-pairs differs" in p for p in problems), problems
    assert any("+4.25 written, the study says 4.30" in p for p in problems), problems
    assert any("−4.25 written, the study says -4.30" in p for p in problems), problems
    assert any("34.2 written, the study says 34.4" in p for p in problems), problems
    # an annotation naming an unknown study or metric is an error, not a pass
    doc.write_text(text.replace("@study-open: mnist fair arcface-open softmax-open map_at_r",
                                "@study-shut: mnist fair arcface-open softmax-open map_at_r")
                   .replace("<!-- table:open-cells -->\n<!-- /table -->\n", ""))
    problems = ft.check(files=[doc], open_dir=study)
    assert any("unknown study 'study-shut'" in p for p in problems), problems


def _remedy_record(tmp_runs: Path, head: str, seed: int, trapped_end: int, trapped_first: int):
    """A run record with 100 test images, `trapped_end` of them at θ_y ≥ 140°
    at the end, and a first-epoch histogram with `trapped_first` of 1,000."""
    edges = list(range(0, 181, 2))
    counts = [0] * (len(edges) - 1)
    counts[edges.index(90)] = 100 - trapped_end
    counts[edges.index(150)] = trapped_end
    first = [0] * 36
    first[18] = 1000 - trapped_first          # 90-95°
    first[28] = trapped_first                 # 140-145°
    record = {"name": f"cifar10-fair-{head}-seed{seed}", "theta_hist": {"counts": counts,
                                                                        "edges": edges},
              "history": {"theta_hist": [first]}}
    (tmp_runs / f"cifar10-fair-{head}-seed{seed}.json").write_text(json.dumps(record))


def test_the_remedies_table(ft, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    heads = {"arcface": (100, 1000), "arcface-easy": (10, 250), "cosface": (0, 0),
             "adaface": (0, 0)}
    accuracy = {"arcface": 60.0, "arcface-easy": 63.0, "cosface": 65.0, "adaface": 66.0}
    for head, (end, first) in heads.items():
        _remedy_record(runs, head, 0, end, first)
    cell = lambda h: {"dataset": "cifar10", "preset": "fair", "head": h, "n": 1,  # noqa: E731
                      "mean": accuracy[h], "std": 0.0, "seeds": [0]}
    pair = lambda a, b: {"dataset": "cifar10", "preset": "fair", "a": a, "b": b, "n": 1,  # noqa: E731
                         "mean_diff": accuracy[a] - accuracy[b], "ci95": None,
                         "diffs": [accuracy[a] - accuracy[b]]}
    summary = {"cells": [cell(h) for h in heads],
               "pairs": [pair(a, b) for i, a in enumerate(heads) for b in list(heads)[i + 1:]]}
    rows = ft.table(summary, "remedies-cifar10", runs).splitlines()
    easy = next(r for r in rows if r.startswith("| ArcFace, easy margin |"))
    assert easy == "| ArcFace, easy margin | 1 | 63.00 | 25.0 | 10.0 | +3.00 | -2.00 | -3.00 |"
    assert rows[2].startswith("| ArcFace (fallback") and "| 100.0 | 100.0 | – |" in rows[2]
    assert len(rows) == 2 + len(heads)
    # a cell of other settings, not a known remedy: a row under its own name
    _remedy_record(runs, "cosface-m0.3", 0, 0, 0)
    accuracy["cosface-m0.3"] = 64.0
    summary["cells"].append(cell("cosface-m0.3"))
    summary["pairs"] += [pair("cosface-m0.3", b) for b in ("arcface", "cosface", "adaface")]
    rows = ft.table(summary, "remedies-cifar10", runs).splitlines()
    assert rows[-1] == "| cosface-m0.3 | 1 | 64.00 | 0.0 | 0.0 | +4.00 | -1.00 | -2.00 |"
    # a cell whose record is missing, or whose per-epoch histogram has other bins, is refused
    (runs / "cifar10-fair-arcface-easy-seed0.json").unlink()
    with pytest.raises(ft.FindingsError, match="arcface-easy-seed0.json does not exist"):
        ft.table(summary, "remedies-cifar10", runs)
    _remedy_record(runs, "arcface-easy", 0, 10, 250)
    record = json.loads((runs / "cifar10-fair-arcface-easy-seed0.json").read_text())
    record["history"]["theta_hist"][0] = [1] * 18
    (runs / "cifar10-fair-arcface-easy-seed0.json").write_text(json.dumps(record))
    with pytest.raises(ft.FindingsError, match="18 bins"):
        ft.table(summary, "remedies-cifar10", runs)
    record["history"]["theta_hist"][0] = [0] * 36
    (runs / "cifar10-fair-arcface-easy-seed0.json").write_text(json.dumps(record))
    with pytest.raises(ft.FindingsError, match="no images"):
        ft.table(summary, "remedies-cifar10", runs)


def test_trapped_after_an_epoch_annotation(ft, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    _remedy_record(runs, "arcface-easy", 0, 10, 250)
    study = {"summary": {}, "dir": tmp_path}
    assert ft.lookup(study, "run", "cifar10-fair-arcface-easy-seed0 trapped_epoch_1") == 25.0
    with pytest.raises(ft.FindingsError, match="no θ_y histogram after epoch 2"):
        ft.lookup(study, "run", "cifar10-fair-arcface-easy-seed0 trapped_epoch_2")
