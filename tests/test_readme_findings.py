"""benchmarks/readme_findings.py writes the README's study section from the
committed study folder: its numbers are the summary's, cells not run yet are
left out, and rewriting the README twice changes nothing."""
import copy
from pathlib import Path

import numpy as np
import pytest
from reference import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "benchmarks" / "study"


@pytest.fixture(scope="module")
def rf():
    return benchmark_module("readme_findings")


@pytest.fixture(scope="module")
def committed(rf):
    return rf.load(STUDY)


def test_numbers_are_the_summarys(rf, committed):
    summary, runs = committed
    text = rf.findings(summary, runs)
    fair = [p for p in summary["pairs"] if (p["dataset"], p["preset"]) == ("cifar10", "fair")
            and {p["a"], p["b"]} == {"adaface", "arcface"}][0]
    sign = 1 if fair["a"] == "adaface" else -1
    assert f"`fair` AdaFace − ArcFace = {sign * fair['mean_diff']:+.2f} points" in text
    arc = [r for r in runs if (r["dataset"], r["preset"], r["head"]) == ("cifar10", "fair", "arcface")]
    for r in arc:
        assert f"{100 * r['test_accuracy']:.2f}" in text
    assert max(len(line) for line in text.splitlines()) <= 78
    assert "\n% " not in text and not any(line.startswith("%") for line in text.splitlines())


def test_cells_not_run_are_left_out(rf, committed):
    summary, runs = copy.deepcopy(committed)
    assert any(c["head"] == "cosface" and c["dataset"] == "cifar10" for c in summary["cells"])
    summary["cells"] = [c for c in summary["cells"]
                        if (c["dataset"], c["head"]) != ("cifar10", "cosface")]
    summary["pairs"] = [p for p in summary["pairs"]
                        if p["dataset"] != "cifar10" or "cosface" not in (p["a"], p["b"])]
    runs = [r for r in runs if (r["dataset"], r["head"]) != ("cifar10", "cosface")]
    text = " ".join(rf.findings(summary, runs).split())
    assert "CosFace, with AdaFace's m = 0.4" not in text
    assert "`fair` CosFace (3)" in text                  # named as remaining instead


def test_readme_rewrite_is_idempotent_and_local(rf, committed, tmp_path):
    summary, runs = committed
    extra = rf.load_extra(STUDY)                 # the runs beside the grid, as --write reads them
    readme = (ROOT / "README.md").read_text()
    once = rf.update_readme(readme, summary, runs, extra)
    assert rf.update_readme(once, summary, runs, extra) == once
    head = readme.index("Summary of ")
    assert once[:head] == readme[:head]
    assert once[once.index("## Layout"):] == readme[readme.index("## Layout"):]
    assert summary["table"].strip() in once
    with pytest.raises(ValueError, match="## Layout"):
        rf.update_readme(readme.replace("## Layout", "## Files"), summary, runs)
    # --write goes through a temporary file and leaves the new README in place
    target = tmp_path / "README.md"
    target.write_text(readme)
    rf.main(["--study", str(STUDY), "--readme", str(target), "--write"])
    assert target.read_text() == once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_committed_readme_matches_the_committed_study(rf, committed):
    # after `adaloss study ... --max-runs 0`, run `python benchmarks/readme_findings.py --write`
    summary, runs = committed
    readme = (ROOT / "README.md").read_text()
    assert rf.update_readme(readme, summary, runs, rf.load_extra(STUDY)) == readme, \
        "README's study section is stale: python benchmarks/readme_findings.py --write"


def test_softmax_paragraph_follows_its_cell(rf, committed, tmp_path):
    # a CIFAR-10 fair softmax run (made here from a CosFace record) gets its
    # paragraph, with the summary's paired differences; without it, none
    import json

    from adaloss import study

    summary, runs = copy.deepcopy(committed)
    runs = [r for r in runs if (r["dataset"], r["preset"], r["head"]) != ("cifar10", "fair", "softmax")]
    (tmp_path / "runs").mkdir()
    fake = copy.deepcopy([r for r in runs if (r["dataset"], r["preset"], r["head"], r["seed"])
                          == ("cifar10", "fair", "cosface", 0)][0])
    fake.update(head="softmax", name="cifar10-fair-softmax", test_accuracy=0.6421,
                test_accuracy_plain=0.6421)
    for i, r in enumerate(runs + [fake]):
        (tmp_path / "runs" / f"{i:03d}.json").write_text(json.dumps(r))
    with_softmax = study.summarize(tmp_path)
    text = rf.findings(with_softmax, runs + [fake])
    assert "Plain softmax on the same network" in text and "64.21 % over 1 seed" in text
    ada = [r for r in runs if (r["dataset"], r["preset"], r["head"], r["seed"])
           == ("cifar10", "fair", "adaface", 0)][0]
    diff = 100 * (ada["test_accuracy"] - 0.6421)
    assert " ".join(f"AdaFace − softmax = {diff:+.2f} points".split()) in " ".join(text.split())
    without = study.summarize(tmp_path, records=runs)
    assert "Plain softmax" not in rf.findings(without, runs)


def test_committed_run_records_are_standard_json():
    # NaN is not JSON: a missing number is stored as null
    import json

    def reject(constant):
        raise ValueError(constant)

    paths = sorted((STUDY / "runs").glob("*.json"))
    assert paths
    for path in paths:
        record = json.loads(path.read_text(), parse_constant=reject)
        assert {"dataset", "preset", "head", "seed", "history", "test_accuracy"} <= set(record)


def _grid_filled_up(rf, committed, tmp_path):
    """The committed records plus, for every seed not run yet, a copy of the
    cell's seed-0 record with the seed changed and the accuracy moved a little."""
    import json

    from adaloss import study

    _, runs = copy.deepcopy(committed)
    have = {(r["dataset"], r["preset"], r["head"], r["seed"]) for r in runs}
    seed0 = {(r["dataset"], r["preset"], r["head"]): r for r in runs if r["seed"] == 0}
    rng = np.random.default_rng(0)
    for (dataset, preset, head), r in seed0.items():
        for seed in range(rf.PLANNED[dataset]):
            if (dataset, preset, head, seed) not in have:
                fake = copy.deepcopy(r)
                step = float(rng.uniform(-0.01, 0.01))
                fake.update(seed=seed, test_accuracy=r["test_accuracy"] + step,
                            test_accuracy_plain=r["test_accuracy_plain"] + step)
                runs.append(fake)
    (tmp_path / "runs").mkdir()
    for i, r in enumerate(runs):
        (tmp_path / "runs" / f"{i:03d}.json").write_text(json.dumps(r))
    return study.summarize(tmp_path, planned=64), runs


def test_a_complete_grid_reads_as_complete(rf, committed, tmp_path):
    summary, runs = _grid_filled_up(rf, committed, tmp_path)
    assert rf.complete(summary)
    text = rf.table_section(summary) + rf.findings(summary, runs)
    assert text.startswith(f"Summary of all {summary['runs']} runs (")
    assert "so far" not in text and "The grid is complete." in text
    assert "Every cell holds its planned seeds: 5 on MNIST, 3 on CIFAR-10." in text
    assert "remaining cells" not in text


def test_margin_heads_are_judged_against_softmax_by_their_cis(rf, committed):
    summary, runs = copy.deepcopy(committed)
    st = rf.Study(summary, runs)
    ci = {h: st.pair("mnist", "fair", h, "softmax")[1] for h in ("adaface", "cosface", "arcface")}
    said = rf.against_softmax(st, "mnist")
    for head, (lo, hi) in ci.items():
        name = rf.HEAD_NAME[head]
        if lo > 0:
            assert name in said.split("beat")[0]
        elif hi < 0:
            assert name in said.split("worse")[0]
        else:
            assert "holds 0" in said
    # move one pair's interval above 0: that head is named as beating softmax
    for p in summary["pairs"]:
        if (p["dataset"], p["preset"]) == ("mnist", "fair") and \
                {p["a"], p["b"]} == {"cosface", "softmax"}:
            sign = 1 if p["a"] == "cosface" else -1
            p["ci95"] = [sign * 0.1, sign * 0.3]
    said = rf.against_softmax(rf.Study(summary, runs), "mnist")
    assert said.startswith("CosFace beats plain softmax (the CI excludes 0)")
    assert "ArcFace cannot be told from plain softmax (the CIs hold 0)" in said
    assert "stands out" not in said


def _at_angle(record: dict, theta: float) -> dict:
    """The record with every test image at target angle theta (degrees)."""
    edges = np.asarray(record["theta_hist"]["edges"])
    counts = np.zeros(len(edges) - 1, dtype=int)
    counts[np.searchsorted(edges, theta, side="right") - 1] = 10000
    record.update(theta_mean_deg=theta, theta_hist={"counts": counts.tolist(),
                                                    "edges": edges.tolist()})
    return record


@pytest.mark.parametrize("theta, says", [(155.0, "trapped as at 1e-3: the smaller learning rate "
                                                "alone does not keep ArcFace out of the trap;"),
                                         (60.0, "no trap either: on the AdaFace network too "
                                                "the smaller learning rate keeps ArcFace out")])
def test_the_lr_probe_beside_the_grid_answers_which_keeps_arcface_out(rf, committed, theta, says):
    summary, runs = copy.deepcopy(committed)
    before = rf.findings(summary, runs)
    flat = " ".join(before.split())
    assert "the grid does not separate (the `fair` ArcFace at 1e-4 would)" in flat
    probe = copy.deepcopy([r for r in runs if (r["dataset"], r["preset"], r["head"], r["seed"])
                           == ("cifar10", "fair", "arcface", 0)][0])
    runs_at_1e3 = probe["test_accuracy"]
    probe["config"]["lr"] = 1e-4
    _at_angle(probe, theta).update(test_accuracy=0.7012)
    text = " ".join(rf.findings(summary, runs, [probe]).split())
    assert "the grid does not separate" not in text
    assert "the `fair` ArcFace at 1e-4 instead of 1e-3 (seed 0" in text
    assert "scores 70.12 %" in text and says in text
    assert f"; {100 * runs_at_1e3:.2f} % at 1e-3 from the same seed;" in text
    paper = [r for r in runs if (r["dataset"], r["preset"], r["head"]) == ("cifar10", "paper",
                                                                            "arcface")]
    free = [r for r in paper if not rf.is_trapped(r)]
    caught = [r for r in paper if rf.is_trapped(r)]
    if theta > 140 and free and caught:    # the committed cell: seeds in and out of the trap
        assert (f"the report's ArcFace network kept {rf.seed_list(free)[0]} out, and not "
                f"{rf.seed_list(caught)[0]}." in text)
    probe["config"]["lr"] = 3e-4                   # another learning rate answers nothing here
    assert rf.findings(summary, runs, [probe]) == before


def test_runs_beside_the_grid_are_read_from_reproduce_folders(rf, tmp_path):
    import json

    folder = tmp_path / "extra" / "cifar10-fair-arcface-lr1e-4"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "dataset": "cifar10", "preset": "fair", "command": "adaloss reproduce --lr 1e-4",
        "runs": [{"head": "arcface", "seed": 0, "config": {"lr": 1e-4}}]}))
    (tmp_path / "extra" / "notes.txt").write_text("not a run")
    extra = rf.load_extra(tmp_path)
    assert extra == [{"head": "arcface", "seed": 0, "config": {"lr": 1e-4}, "dataset": "cifar10",
                      "preset": "fair", "command": "adaloss reproduce --lr 1e-4"}]
    assert rf.load_extra(tmp_path / "nowhere") == []


@pytest.mark.parametrize("ci, says, mostly", [
    ((0.2, 1.4), "are what AdaFace's adaptivity adds on this network", True),
    ((-0.4, 1.9), "cannot tell", False),
    ((-1.9, -0.2), "CosFace does better than AdaFace", False)])
def test_cosface_paragraph_follows_the_adaface_cosface_interval(rf, committed, ci, says, mostly):
    summary, runs = copy.deepcopy(committed)
    pair = [p for p in summary["pairs"] if (p["dataset"], p["preset"]) == ("cifar10", "fair")
            and {p["a"], p["b"]} == {"adaface", "cosface"}][0]
    sign = 1 if pair["a"] == "adaface" else -1
    pair["ci95"] = sorted(sign * np.asarray(ci))
    text = " ".join(rf.findings(summary, runs).split())
    assert says in text
    assert ("but mostly because ArcFace's margin" in text) == mostly


def _hours_left(text: str) -> float:
    if "The grid is complete." in text:
        return 0.0
    return float(" ".join(text.split()).split("about ")[-1].split(" CPU-hours")[0])


def test_cpu_hours_left_follow_each_cells_own_pace(rf, committed):
    summary, runs = copy.deepcopy(committed)
    before = _hours_left(rf.remaining(rf.Study(summary, runs)))
    key = ("cifar10", "fair", "cosface")
    cell = next(c for c in summary["cells"] if (c["dataset"], c["preset"], c["head"]) == key)
    assert cell["n"] == rf.PLANNED["cifar10"]            # a full cell, left out of the estimate
    cosface = [r for r in runs if (r["dataset"], r["preset"], r["head"]) == key]
    dropped = max(cosface, key=lambda r: r["seed"])
    runs.remove(dropped)
    cell["n"] -= 1
    kept = [r["wall_seconds"] * r.get("threads", 1) for r in cosface if r is not dropped]
    text = " ".join(rf.remaining(rf.Study(summary, runs)).split())
    assert "`fair` CosFace (1)" in text and "not counting" not in text
    assert _hours_left(text) == pytest.approx(before + np.mean(kept) / 3600, abs=0.101)  # two roundings
    summary["cells"].remove(cell)                        # no run left to take a pace from
    runs = [r for r in runs if (r["dataset"], r["preset"], r["head"]) != key]
    text = " ".join(rf.remaining(rf.Study(summary, runs)).split())
    assert "`fair` CosFace (3)" in text and "(not counting the cells without one)" in text


@pytest.mark.parametrize("angles, says", [
    ((60.0, 60.0), "mean θ_y 60°): no trap. Whether its smaller learning rate or its network "
                   "keeps it out"),
    ((155.0, 155.0), "mean θ_y 155°): trapped the same way. `paper`"),
    ((60.0, 155.0), "seed 0 stays out of the trap (mean θ_y 60°), seed 1 falls into it (100 % "
                    "of the test set between 148° and 160° at the end"),
])
def test_paper_arcface_paragraph_follows_each_seeds_angles(rf, committed, angles, says):
    summary, runs = copy.deepcopy(committed)
    paper = [r for r in runs if (r["dataset"], r["preset"], r["head"]) == ("cifar10", "paper",
                                                                            "arcface")]
    for r in paper:                    # even seeds take the first angle, odd ones the second
        _at_angle(r, angles[r["seed"] % 2])
    n = len(paper)
    if n < 2:
        pytest.fail("the committed study holds fewer than 2 `paper` ArcFace seeds on CIFAR-10")
    text = " ".join(rf.cifar_paper_arcface(rf.Study(summary, runs)).split())
    if n > 2 and angles == (60.0, 155.0):
        says = says.replace("seed 0 stays", "seeds 0 and 2 stay")
    assert says in text
    if angles == (60.0, 155.0):        # a trapped seed classified right at over 140°
        acc = 100 * paper[1]["test_accuracy"]
        assert f"at least {acc:.0f} % of the test set is classified right" in text


@pytest.mark.parametrize("diffs, says", [
    ((-6.0, -5.9, -6.1), "ArcFace comes out ahead there, as it is in the report's own runs"),
    ((-6.0, -1.0, -9.0), "ArcFace is ahead on all 3 seeds (the CI still holds 0), as it is"),
    ((-6.0, 4.0, -1.0), "the two cannot be told apart there (the CI holds 0); the two networks"),
    ((2.0, 2.1, 1.9), "AdaFace comes out ahead there too; the two networks"),
])
def test_bottom_line_on_the_paper_pair_follows_its_interval(rf, committed, diffs, says):
    summary, runs = copy.deepcopy(committed)
    pair = next(p for p in summary["pairs"] if (p["dataset"], p["preset"]) == ("cifar10", "paper"))
    sign = 1 if pair["a"] == "adaface" else -1          # the summary's pair is a − b
    half = 4.303 * np.std(diffs, ddof=1) / np.sqrt(3)     # t(0.975, 2 df)
    ci = [np.mean(diffs) - half, np.mean(diffs) + half]
    pair.update(n=3, diffs=[sign * x for x in diffs], mean_diff=sign * float(np.mean(diffs)),
                ci95=sorted(sign * np.asarray(ci)), wilcoxon_p=0.25)
    text = " ".join(rf.bottom_line(rf.Study(summary, runs)).split())
    assert says in text
