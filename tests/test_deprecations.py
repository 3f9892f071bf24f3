"""Names that moved or went out of use still work, with a DeprecationWarning
naming the replacement."""
import numpy as np
import pytest

from adaloss import checkpoint, cli, datasets, fileio, presets, runs, stats, study, training


def test_moved_names_still_resolve_and_warn():
    with pytest.warns(DeprecationWarning, match="adaloss.runs.run_one"):
        assert cli.run_one is runs.run_one
    with pytest.warns(DeprecationWarning, match="adaloss.training.load_latest"):
        assert checkpoint.load_latest is training.load_latest
    with pytest.warns(DeprecationWarning, match="adaloss.training.save_training"):
        assert checkpoint.save_training is training.save_training
    with pytest.raises(AttributeError):
        checkpoint.no_such_name


def test_re_exports_are_the_same_objects():
    # not deprecated: the old homes re-export the one implementation
    assert checkpoint.atomic_write is fileio.atomic_write
    for name in ("wilcoxon_signed_rank", "t_quantile_975", "ci_or_none"):
        assert getattr(study, name) is getattr(stats, name)


def test_old_helpers_warn_and_still_answer():
    h = training.History(epochs=[1, 2], train_loss=[0.5, 0.4], test_accuracy=[0.9, 0.95],
                         seconds=[1.0, 1.1])
    with pytest.warns(DeprecationWarning, match="zip"):
        assert h.rows() == [(1, 0.5, 0.9, 1.0), (2, 0.4, 0.95, 1.1)]
    x = np.zeros((2, 1, 2, 2), np.uint8)
    data = datasets.Dataset(x, np.zeros(2, np.int64), x, np.ones(2, np.int64), ["a"])
    with pytest.warns(DeprecationWarning, match="fields"):
        (xtr, ytr), (xte, yte), classes = data
    assert yte.tolist() == [1, 1] and classes == ["a"]
    trainer = presets.build(presets.runs("mnist", "fair")[0], seed=0)
    images = np.random.default_rng(0).integers(0, 256, (5, 1, 28, 28), dtype=np.uint8)
    with pytest.warns(DeprecationWarning, match="trainer.embed"):
        old = training.embed(trainer.net, images, batch_size=2)
    np.testing.assert_array_equal(old, trainer.embed(images, batch_size=2))
    assert old.shape == (5, trainer.net.output_dim)


def test_a_layer_still_unpacks_as_the_tuple_it_was():
    """Preset layers were tuples ("conv", 1, 32) before LayerSpec: unpacking and
    indexing still work, with a DeprecationWarning."""
    layer = presets.ARCFACE_NETS["mnist"][0]
    with pytest.warns(DeprecationWarning, match="layer as a tuple"):
        kind, cin, cout = layer
    assert (kind, cin, cout) == ("conv", 1, 32)
    with pytest.warns(DeprecationWarning):
        assert layer[2] == 32 and len(presets.LayerSpec("relu")) == 1
