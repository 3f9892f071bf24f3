"""The closed and open protocols: the split is seeded and recorded, the open
head has one class per seen class, closed runs keep their names, records and
numbers; the study keeps protocols apart; the metrics and their figures."""
from __future__ import annotations

import json

import numpy as np
import pytest

import synthetic
import adaloss
from adaloss import datasets, plots, presets, runs, study


@pytest.fixture(scope="module")
def data():
    x_tr, y_tr, x_te, y_te = synthetic.arrays(classes=6, per_class=30, shape=(1, 16, 16))
    return datasets.Dataset(x_tr, y_tr, x_te, y_te, classes=[f"c{i}" for i in range(6)],
                            name="toy")


def test_the_split_is_a_seeded_half_of_the_classes():
    for seed in range(5):
        seen, unseen = runs.split_classes(10, seed)
        assert (seen, unseen) == runs.split_classes(10, seed)      # deterministic
        assert len(seen) == len(unseen) == 5 and sorted(seen + unseen) == list(range(10))
        assert seen == sorted(seen)
    assert len({tuple(runs.split_classes(10, s)[0]) for s in range(5)}) > 1   # seeds differ
    assert [len(h) for h in runs.split_classes(7, 0)] == [4, 3]
    with pytest.raises(ValueError, match="at least 4 classes"):
        runs.split_classes(3, 0)


def test_protocol_data_keeps_the_seen_classes_relabelled(data):
    seen = [1, 4, 5]
    part = runs.protocol_data(data, seen)
    assert set(part.train_labels.tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(part.train_images[part.train_labels == 1],
                                  data.train_images[data.train_labels == 4])
    assert part.classes == ["c1", "c4", "c5"]
    assert len(part.test_labels) == np.isin(data.test_labels, seen).sum()


def test_an_open_run_trains_k_classes_and_records_its_split(data, tmp_path):
    config = runs.configs(data, "fair", epochs=1, protocol="open")[2]
    assert config.name == "toy-fair-arcface-open" and config.protocol == "open"
    record = runs.run_one(config, 3, data, progress=False, model_path=tmp_path / "m.ckpt")
    seen, unseen = runs.split_classes(6, 3)
    assert record["classes"] == {"seen": seen, "unseen": unseen}
    assert record["protocol"] == "open" and record["config"]["num_classes"] == 3
    assert record["config"]["protocol"] == "open"
    m = record["metrics"]
    assert m["classes"] == record["classes"]
    assert m["num_unseen_test"] == np.isin(data.test_labels, unseen).sum()
    assert m["retrieval"]["num_queries"] == m["num_unseen_test"]      # unseen images only
    assert set(m["open_set"]) >= {"class_weights", "gallery"}
    assert m["open_set"]["num_known"] == np.isin(data.test_labels, seen).sum()
    assert 0 <= m["open_set"]["class_weights"]["auroc"] <= 1
    assert m["seen_accuracy"] == pytest.approx(record["test_accuracy_plain"])
    config2, trainer, extra = runs.load_model(tmp_path / "m.ckpt")
    assert trainer.head.num_classes == 3 and trainer.head.weight.shape == (3, 128)
    assert extra["classes"]["seen"] == seen and config2.protocol == "open"
    again = runs.evaluate_model(trainer.net, trainer.head, data, "open", 3, seen)
    assert again == m


def test_closed_runs_keep_their_names_records_and_numbers(data):
    config = runs.configs(data, "fair", epochs=1)[0]
    for ds, preset in (("mnist", "report"), ("cifar10", "fair")):
        for c in presets.runs(ds, preset):
            assert c.name == f"{ds}-{preset}-{c.head}"
            assert "protocol" not in c.to_dict() and "input_shape" not in c.to_dict()
            assert presets.RunConfig.from_dict(c.to_dict()) == c
    with_metrics = runs.run_one(config, 0, data, progress=False)
    without = runs.run_one(config, 0, data, progress=False, evaluate=False)
    assert "metrics" not in without and with_metrics["protocol"] == "closed"
    for key in ("test_accuracy", "test_accuracy_plain", "theta_hist", "sample_predictions"):
        assert with_metrics[key] == without[key]       # measuring changes nothing
    assert with_metrics["history"]["train_loss"] == without["history"]["train_loss"]
    m = with_metrics["metrics"]
    assert m["open_set"] is None and m["accuracy"] == pytest.approx(without["test_accuracy"])
    assert m["retrieval"]["num_queries"] == len(data.test_labels)
    n = len(data.test_labels)
    assert m["verification"]["num_pairs"] == n * (n - 1) // 2
    json.dumps(m, allow_nan=False)


def test_the_curves_are_the_exact_histograms_of_the_pair_cosines(data):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(60, 8)).astype(np.float32)
    labels = np.repeat(np.arange(6), 10)
    out = runs._embedding_metrics(emb, labels, seed=0)
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    i, j = np.triu_indices(60, 1)
    cos = np.einsum("pd,pd->p", e[i].astype(np.float64), e[j].astype(np.float64))
    genuine = labels[i] == labels[j]
    edges = np.asarray(out["curves"]["cos_edges"])
    # tiny float differences may move a score across a bin edge: compare cumulatively
    for key, mask in (("genuine_counts", genuine), ("impostor_counts", ~genuine)):
        counts = np.asarray(out["curves"][key])
        assert counts.sum() == mask.sum()
        expected, _ = np.histogram(cos[mask], bins=edges)
        assert np.abs(np.cumsum(counts) - np.cumsum(expected)).max() <= 1
    far = np.asarray(out["curves"]["roc"]["far"])
    assert far.min() * out["verification"]["num_impostor"] >= 1      # no FAR below 1 / N
    assert np.all(np.diff(out["curves"]["roc"]["tar"]) >= 0)


def test_the_verification_figures(data, tmp_path):
    config = runs.configs(data, "fair", epochs=1)
    records = [runs.run_one(c, 0, data, progress=False) for c in (config[0], config[3])]
    fig = plots.score_histograms(records)
    assert len(fig.axes) == 2 and fig.axes[0].get_title().startswith("Softmax (AUROC ")
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ["impostor", "genuine"]
    fig = plots.roc_curves(records)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and len(ax.get_lines()) == 3   # two heads, chance
    np.testing.assert_allclose(ax.get_lines()[1].get_ydata(),
                               records[1]["metrics"]["curves"]["roc"]["tar"])
    plots.save(fig, tmp_path / "roc.png")
    figs = plots.figures_from_results({"dataset": "toy", "preset": "fair", "runs": records}, data)
    assert {"scores", "roc", "samples"} <= set(figs)
    with pytest.raises(ValueError, match="no run holds"):
        plots.roc_curves([{"head": "arcface"}])


def test_the_study_names_open_runs_apart_and_never_mixes_protocols(tmp_path):
    closed = study.plan(["mnist"], ["fair"], {"mnist": 1}, heads=["arcface"])
    opened = study.plan(["mnist"], ["fair"], {"mnist": 1}, heads=["arcface"], protocol="open")
    assert [t[0] for t in closed] == ["mnist-fair-arcface-seed0"]
    assert [t[0] for t in opened] == ["mnist-fair-arcface-open-seed0"]
    assert opened[0][1].protocol == "open"
    with pytest.raises(ValueError, match="protocol"):
        study.plan(["mnist"], ["fair"], {"mnist": 1}, protocol="half")
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()

    def record(rid, config, acc, protocol):
        rec = {"name": config.name, "head": config.head, "seed": 0, "dataset": "mnist",
               "preset": "fair", "test_accuracy": acc, "test_accuracy_plain": acc,
               "wall_seconds": 1.0, "threads": 1, "subset": None,
               # an open run's head has one class per seen class
               "config": dict(config.to_dict(), **({"num_classes": 5} if protocol else {})),
               "adaloss_version": adaloss.__version__,
               "history": {"epochs": [1], "test_accuracy": [acc], "train_loss": [1.0]}}
        if protocol:
            rec["protocol"] = protocol
        (runs_dir / f"{rid}.json").write_text(json.dumps(rec))

    record(closed[0][0], closed[0][1], 0.9, None)          # a record written before protocols
    record(opened[0][0], opened[0][1], 0.5, "open")
    for protocol, acc in (("open", 50.0), ("closed", 90.0)):
        summary = study.study(["mnist"], ["fair"], 1, tmp_path, heads=["arcface"], max_runs=0,
                              progress=False, protocol=protocol)
        assert summary["runs"] == 1 and summary["cells"][0]["accuracies"] == [acc]


def test_the_cli_offers_the_protocols_and_evaluate():
    from adaloss import cli

    choices = cli.parser()._subparsers._group_actions[0].choices
    for command, options in (("reproduce", ("--protocol", "--test-fraction", "--no-models",
                                           "--metrics-every-epoch")),
                             ("study", ("--protocol",)),
                             ("evaluate", ("--dataset", "--protocol", "--data-root", "--subset",
                                           "--json"))):
        text = choices[command].format_help()
        for opt in options:
            assert opt in text, (command, opt)
    args = cli.parser().parse_args(["study", "--protocol", "open"])
    assert args.protocol == "open"
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["reproduce", "--dataset", "mnist", "--protocol", "half"])


def test_metrics_every_epoch_are_recorded_without_changing_training(data):
    config = runs.configs(data, "fair", epochs=2, protocol="open")[3]
    plain = runs.run_one(config, 1, data, progress=False)
    each = runs.run_one(config, 1, data, progress=False, metrics_every_epoch=True)
    assert "metrics_per_epoch" not in plain
    assert [m["epoch"] for m in each["metrics_per_epoch"]] == [1, 2]
    assert each["history"]["train_loss"] == plain["history"]["train_loss"]
    assert each["metrics"] == plain["metrics"]
    last = each["metrics_per_epoch"][-1]
    assert last["map_at_r"] == each["metrics"]["retrieval"]["map_at_r"]
    assert last["open_set_auroc_gallery"] == each["metrics"]["open_set"]["gallery"]["auroc"]


@pytest.mark.slow
def test_an_open_study_resumes_and_summarises_its_embedding_metrics(tmp_path, shared_data):
    """A real open run records a head of 5 classes; resuming the study (or
    summarising it with max_runs=0) used to refuse that record as made with
    other settings (num_classes 5 there, 10 now). The summary holds, per cell,
    the embedding metrics and their paired differences."""
    kwargs = dict(datasets=["mnist"], presets=["fair"], seeds=2, epochs=1, subset=600,
                  data_root=shared_data, workers=1, progress=False, out=tmp_path,
                  heads=["softmax", "arcface"], protocol="open")
    first = study.study(**kwargs)
    again = study.study(max_runs=0, **kwargs)
    assert first["runs"] == again["runs"] == 4
    records = {r["name"] + str(r["seed"]): r for r in study._read_runs(tmp_path)}
    assert {r["config"]["num_classes"] for r in records.values()} == {5}
    cell = next(c for c in again["cells"] if c["head"] == "arcface-open")
    ours = [records[f"mnist-fair-arcface-open{s}"] for s in (0, 1)]
    np.testing.assert_allclose(cell["metrics"]["map_at_r"]["values"],
                               [100 * r["metrics"]["retrieval"]["map_at_r"] for r in ours])
    tar = [next(e["tar"] for e in r["metrics"]["verification"]["tar_at_far"]
                if e["far"] == 1e-3) for r in ours]
    assert cell["metrics"]["tar_at_far_1e-3"]["mean"] == pytest.approx(100 * np.mean(tar))
    hist = ours[0]["theta_hist"]
    trapped = sum(c for c, e in zip(hist["counts"], hist["edges"]) if e >= 140)
    assert cell["metrics"]["trapped"]["values"][0] == pytest.approx(
        100 * trapped / sum(hist["counts"]))
    pair = next(p for p in again["metric_pairs"] if p["metric"] == "open_set_auroc")
    a = next(c for c in again["cells"] if c["head"] == pair["a"])["metrics"]["open_set_auroc"]
    b = next(c for c in again["cells"] if c["head"] == pair["b"])["metrics"]["open_set_auroc"]
    np.testing.assert_allclose(pair["diffs"], np.subtract(a["values"], b["values"]))
    assert "MAP@R" in again["table"] and "open-set AUROC" in again["table"]


@pytest.mark.slow
def test_an_open_study_with_twin_cells_resumes(tmp_path, shared_data):
    """The paper and fair AdaFace cells make the same run; the copy filed
    under the second cell must record the head the run trained (5 classes),
    or resuming refuses it as made with other settings."""
    kwargs = dict(datasets=["mnist"], presets=["paper", "fair"], seeds=1, epochs=1, subset=300,
                  data_root=shared_data, workers=1, progress=False, out=tmp_path,
                  heads=["adaface"], protocol="open")
    assert study.study(**kwargs)["runs"] == 2
    records = study._read_runs(tmp_path)
    assert sum("same_run_as" in r for r in records) == 1
    assert {r["config"]["num_classes"] for r in records} == {5}
    assert study.study(max_runs=0, **kwargs)["runs"] == 2
    # the verification figures of each data set and preset, beside the others
    for name in ("roc-mnist-paper.png", "roc-mnist-fair.png", "scores-mnist-fair.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name


@pytest.mark.parametrize("broken", [
    {"theta_hist": "wide"}, {"theta_hist": {"counts": [1, None], "edges": [0, 90, 180]}},
    {"theta_hist": {"counts": [1, 2], "edges": [0, 180]}},
    {"metrics": {"verification": {"tar_at_far": [0.5, None]}}},
    {"metrics": {"retrieval": {"map_at_r": "high"}}}, {"metrics": []},
])
def test_the_summary_leaves_out_a_metric_a_record_holds_badly(tmp_path, broken):
    """A record whose metrics or angle histogram are malformed summarises
    without that metric (the cell's others stay) instead of raising."""
    config = presets.runs("mnist", "fair")[0]
    good = {"name": config.name, "head": config.head, "dataset": "mnist", "preset": "fair",
            "test_accuracy": 0.9, "test_accuracy_plain": 0.9, "wall_seconds": 1.0,
            "threads": 1, "config": config.to_dict(),
            "theta_hist": {"counts": [3, 1], "edges": [0.0, 140.0, 180.0]},
            "metrics": {"retrieval": {"map_at_r": 0.5},
                        "verification": {"tar_at_far": [{"far": 0.001, "tar": 0.25}]}}}
    records = [dict(good, seed=0), dict(good, seed=1, **broken)]
    summary = study.summarize(tmp_path, records=records)
    metrics = summary["cells"][0]["metrics"]
    broken_keys = {"theta_hist": "trapped", "metrics": None}
    gone = broken_keys[next(iter(broken))]
    if gone:
        assert gone not in metrics and "map_at_r" in metrics
    else:
        assert "trapped" in metrics and metrics["trapped"]["values"] == [25.0, 25.0]


def test_malformed_verification_curves_are_left_out_of_the_study_figures():
    config = presets.runs("mnist", "fair")[0]
    curves = {"cos_edges": [-1.0, 0.0, 1.0], "genuine_counts": [1, 3], "impostor_counts": [3, 1],
              "roc": {"far": [0.25, 1.0], "tar": [0.75, 1.0]}}
    good = {"name": config.name, "head": config.head, "dataset": "mnist", "preset": "fair",
            "seed": 0, "metrics": {"curves": curves}}
    bad = [dict(good, seed=s, head=h, name=f"mnist-fair-{h}", metrics=m) for s, (h, m) in
           enumerate([("cosface", {"curves": dict(curves, roc=None)}),
                      ("arcface", {"curves": dict(curves, genuine_counts=[1])}),
                      ("adaface", {"curves": dict(curves, cos_edges=[0.0, "x", 1.0])}),
                      ("arcface", "nothing")])]
    runs_ = study._verification_runs([good] + bad)
    assert list(runs_) == [("mnist", "fair")] and runs_["mnist", "fair"] == [good]


def test_each_data_sets_verification_figures_show_its_own_runs(tmp_path, monkeypatch):
    """The ROC and score figures of a study with two data sets: each file is
    drawn from its own data set's runs and titled with it (the titles once
    all named the last data set)."""
    from matplotlib.figure import Figure

    drawn = {}

    def fake(kind):
        def draw(records, title):
            drawn[(kind, title.split(",")[0])] = {r["dataset"] for r in records}
            return Figure()
        return draw

    from adaloss import plots as plots_module
    monkeypatch.setattr(plots_module, "roc_curves", fake("roc"))
    monkeypatch.setattr(plots_module, "score_histograms", fake("scores"))
    curves = {"cos_edges": [-1.0, 0.0, 1.0], "genuine_counts": [1, 3], "impostor_counts": [3, 1],
              "roc": {"far": [0.25, 1.0], "tar": [0.75, 1.0]}}
    records = []
    for dataset in ("mnist", "cifar10"):
        config = presets.runs(dataset, "fair")[0]
        records.append({"name": config.name, "head": config.head, "dataset": dataset,
                        "preset": "fair", "seed": 0, "config": config.to_dict(),
                        "test_accuracy": 0.5, "test_accuracy_plain": 0.5, "wall_seconds": 1.0,
                        "history": {"epochs": [1], "test_accuracy": [0.5], "train_loss": [1.0]},
                        "metrics": {"curves": curves}})
    summary = study.summarize(tmp_path, records=records)
    study.write_summary(tmp_path, summary, records)
    assert drawn == {(k, d): {d} for k in ("roc", "scores") for d in ("mnist", "cifar10")}
    assert (tmp_path / "roc-cifar10-fair.png").exists()


def test_a_studys_theta_figures_show_each_cells_first_run_with_histograms(tmp_path, monkeypatch):
    """theta-DATASET-PRESET.png: the lowest seed of each cell whose record has
    per-epoch θ_y histograms; a malformed one is left out, not an error, and a
    folder without any has no such figure."""
    drawn = {}

    def fake(records, title):
        drawn[title.split(",")[0]] = sorted((r["name"], r["seed"]) for r in records)
        return real(records, title)

    from adaloss import plots as plots_module
    real = plots_module.theta_epochs
    monkeypatch.setattr(plots_module, "theta_epochs", fake)
    edges = list(range(0, 181, 5))
    good = [[0] * 35 + [7], [1] * 36]
    records = []
    for head, seed, hist in (("arcface", 1, good), ("arcface", 0, good), ("cosface", 0, good),
                             ("softmax", 0, [[1] * 18]), ("adaface", 0, None)):
        config = next(c for c in presets.runs("cifar10", "fair") if c.head == head)
        history = {"epochs": [1, 2], "test_accuracy": [0.5, 0.5], "train_loss": [1.0, 1.0]}
        if hist is not None:
            history["theta_hist"] = hist
        records.append({"name": config.name, "head": head, "dataset": "cifar10",
                        "preset": "fair", "seed": seed, "config": config.to_dict(),
                        "test_accuracy": 0.5, "test_accuracy_plain": 0.5, "wall_seconds": 1.0,
                        "history": history, "diagnostics": {"images": 7, "edges_deg": edges}})
    # malformed diagnostics leave their run out (these heads' runs would
    # otherwise be drawn)
    for head, diagnostics in (("arcface-easy", {"edges_deg": "5-degree bins"}),
                              ("arcface-clip", {"edges_deg": [0, None] + edges[2:]}),
                              ("arcface-mwarm5", "5-degree bins"), ("arcface-swarm2", [1, 2]),
                              ("combined-1-0.3-0.2", {"edges_deg": edges[::-1]})):
        records.append(dict(records[1], name=f"cifar10-fair-{head}", diagnostics=diagnostics))
    summary = study.summarize(tmp_path, records=records)
    study.write_summary(tmp_path, summary, records)
    assert drawn == {"cifar10": [("cifar10-fair-arcface", 0), ("cifar10-fair-cosface", 0)]}
    assert (tmp_path / "theta-cifar10-fair.png").read_bytes()[:4] == b"\x89PNG"
    # the runs lose their histograms: the figure goes with the next summary
    for r in records:
        r["history"].pop("theta_hist", None)
    study.write_summary(tmp_path, study.summarize(tmp_path, records=records), records)
    assert not (tmp_path / "theta-cifar10-fair.png").exists()
