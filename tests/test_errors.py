"""The C core's error contract, seen from Python: every range check lives in
C, its message (naming the argument and the expected range) becomes the
exception's, and a call that fails changes nothing."""
import numpy as np
import pytest

import adaloss
from adaloss import _core


def test_enums_are_exported_by_the_extension():
    kinds = [_core.HEAD_SOFTMAX, _core.HEAD_COSFACE, _core.HEAD_ARCFACE, _core.HEAD_ADAFACE,
             _core.HEAD_COMBINED]
    assert kinds == sorted(set(kinds))
    rules = [_core.MARGIN_FALLBACK, _core.MARGIN_EASY, _core.MARGIN_CLIP,
             _core.MARGIN_STRAIGHT_THROUGH]
    assert rules == sorted(set(rules)) and _core.MARGIN_FALLBACK == 0
    assert _core.VARIANT_PAPER != _core.VARIANT_REPORT
    assert _core.RULE_PLAIN != _core.RULE_REPORT
    layers = [_core.LAYER_CONV2D, _core.LAYER_RELU, _core.LAYER_MAXPOOL2D,
              _core.LAYER_FLATTEN, _core.LAYER_LINEAR, _core.LAYER_L2NORM]
    assert len(set(layers)) == 6
    statuses = [_core.OK, _core.ENOMEM, _core.EINVAL, _core.ENONFINITE, _core.ESTATE]
    assert len(set(statuses)) == 5 and _core.OK == 0
    # the Python classes use the exported values
    assert adaloss.Conv2d(1, 2).spec()[0] == _core.LAYER_CONV2D
    assert adaloss.Linear(2, 3).spec()[0] == _core.LAYER_LINEAR
    assert adaloss.Flatten().spec()[0] == _core.LAYER_FLATTEN


def test_bad_head_kind_is_a_value_error_naming_the_argument():
    # it used to surface as a bare MemoryError
    for kind in (-1, 5, 99):
        with pytest.raises(ValueError, match=r"kind: expected 0\.\.4.*got %d" % kind):
            _core.head_create(kind, 0, 10, 8, 1.0, 0.0, 0.3, 0.01)
    with pytest.raises(ValueError, match=r"variant: expected .* got 2"):
        _core.head_create(_core.HEAD_ARCFACE, 2, 10, 8, 1.0, 0.0, 0.3, 0.01)


# (call, argument named, a fragment of the expected range) for every range the
# C core checks; each message must reach Python unchanged
def _head(**kw):
    args = dict(kind=_core.HEAD_ADAFACE, variant=0, C=10, D=8, s=64.0, m=0.4, h=0.333,
                t_alpha=0.01)
    args.update(kw)
    return lambda: _core.head_create(*args.values())


def _small_parts():
    net = adaloss.Sequential([adaloss.Flatten(), adaloss.Linear(16, 8)], input_shape=(1, 4, 4))
    head = adaloss.AdaFace(5, 8)
    opt = adaloss.Adam(net.parameters() + head.parameters())
    return net, head, opt


def _range_cases():
    net, head, opt = _small_parts()
    x = np.zeros((2, 1, 4, 4), np.float32)
    emb = np.ones((2, 8), np.float32)
    return [
        ("num_classes", _head(C=0), r"1\.\.16777216, got 0"),
        ("embedding_dim", _head(D=1 << 25), r"1\.\.16777216, got 33554432"),
        ("num_classes \\* embedding_dim", _head(C=1 << 15, D=1 << 14), r"at most 268435456"),
        ("s", _head(s=0.0), r"\(0, 10000\], got 0"),
        ("s", _head(s=float("inf")), r"\(0, 10000\], got inf"),
        ("m", _head(m=4.0), r"\[0, pi\], got 4"),
        ("h", _head(h=-1.0), r"\[0, 1000\], got -1"),
        ("t_alpha", _head(t_alpha=2.0), r"\[0, 1\], got 2"),
        ("num_threads", lambda: _core.set_num_threads(0), r"1\.\.\d+, got 0"),
        ("num_threads", lambda: _core.set_num_threads(_core.MAX_THREADS + 1),
         r"1\.\.%d, got %d" % (_core.MAX_THREADS, _core.MAX_THREADS + 1)),
        ("layers", lambda: _core.net_create([], (1, 4, 4)), r"1 to 10000 layers, got 0"),
        ("layers\\[0\\]\\.kind", lambda: _core.net_create([(42, 0, 0, 0, 0)], (1, 4, 4)),
         r"expected 0\.\.5, got 42"),
        ("input_shape", lambda: _core.net_create([(_core.LAYER_RELU, 0, 0, 0, 0)], (0, 4, 4)),
         r"positive sizes, got \(0, 4, 4\)"),
        ("layer 0 \\(Conv2d\\)", lambda: _core.net_create([(_core.LAYER_CONV2D, 1, 2, 2, 0)],
                                                          (1, 4, 4)),
         r"odd kernel_size in 1\.\.63"),
        ("layer 1 \\(Linear\\)", lambda: _core.net_create(
            [(_core.LAYER_FLATTEN, 0, 0, 0, 0), (_core.LAYER_LINEAR, 16, 0, 0, 0)], (1, 4, 4)),
         r"out_features in 1\.\.16777216 expected, got 0"),
        ("lr", lambda: _core.adam_create([], -1.0, 0.9, 0.999, 1e-8, 0.0), r"\[0, 1000\], got -1"),
        ("betas", lambda: _core.adam_create([], 1e-3, 0.9, 1.0, 1e-8, 0.0), r"\[0, 1\), got"),
        ("eps", lambda: _core.adam_create([], 1e-3, 0.9, 0.999, 2.0, 0.0), r"\[0, 1\], got 2"),
        ("weight_decay", lambda: _core.adam_create([], 1e-3, 0.9, 0.999, 1e-8, -1.0),
         r"\[0, 1000\], got -1"),
        ("step", lambda: _core.adam_set(opt._handle, -3, 1e-3), r">= 0, got -3"),
        ("std", lambda: _core.head_set_stats(head._handle, 1.0, -2.0), r">= 0, got -2"),
        ("mean", lambda: _core.head_set_stats(head._handle, float("nan"), 1.0),
         r"finite number, got nan"),
        ("labels", lambda: _core.head_forward(head._handle, emb, np.array([0, 5]), True),
         r"\[0, 5\) \(num_classes\), got 5 at index 1"),
        ("labels", lambda: _core.head_logits(head._handle, emb, np.array([-1, 0]), 0),
         r"\[0, 5\) \(num_classes\), got -1 at index 0"),
        ("labels", lambda: _core.train_step(net._handle, head._handle, opt._handle, x,
                                            np.array([0, 7]), False, True),
         r"\[0, 5\) \(num_classes\), got 7 at index 1"),
        ("emb", lambda: _core.head_forward(head._handle, np.zeros((0, 8), np.float32),
                                           np.zeros(0, np.int64), True),
         r"batch of 1\.\.16777216 examples, got 0"),
        ("x", lambda: _core.train_step(net._handle, head._handle, opt._handle, x[:0],
                                       np.zeros(0, np.int64), False, True),
         r"batch of 1\.\.16777216 examples, got 0"),
        ("rule", lambda: _core.head_logits(head._handle, emb, None, 2),
         r"0 \(plain\) or 1 \(report\), got 2"),
        ("d_emb", lambda: _core.net_backward(net._handle, np.ones((2, 8), np.float32), False),
         r"no forward yet"),
    ]


def test_each_range_error_from_c_reaches_python():
    for name, call, expected in _range_cases():
        with pytest.raises(ValueError, match=f"^{name}: .*{expected}"):
            call()


def _adaface_trainer(layers):
    net = adaloss.Sequential(layers, input_shape=(1, 4, 4))
    head = adaloss.AdaFace(5, 16)
    head.set_running_stats(7.0, 3.0)
    opt = adaloss.Adam(net.parameters() + head.parameters())
    return net, head, adaloss.Trainer(net, head, opt)


def _snapshot(net, head, opt):
    return ([p.data.copy() for p in net.parameters()], head.weight.copy(),
            (head.running_mean, head.running_std), opt.step_count)


def _assert_unchanged(before, after):
    for a, b in zip(before[0], after[0]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(before[1], after[1])
    assert before[2] == after[2]          # AdaFace running mean and std, exactly
    assert before[3] == after[3]          # Adam step count


def test_failing_step_leaves_running_stats_and_weights_untouched():
    """A network of Flatten alone cannot take the head's gradient: the step
    fails. It used to update the AdaFace running statistics first."""
    net, head, trainer = _adaface_trainer([adaloss.Flatten()])
    x = np.random.default_rng(0).integers(0, 256, (4, 1, 4, 4), dtype=np.uint8)
    before = _snapshot(net, head, trainer.optimizer)
    with pytest.raises(ValueError) as failure:
        trainer.step(x, np.array([0, 1, 2, 3]))
    _assert_unchanged(before, _snapshot(net, head, trainer.optimizer))
    assert str(failure.value).startswith("net: ") and "Flatten" in str(failure.value)


@pytest.mark.parametrize("case", ["label", "nan input", "empty batch"])
def test_rejected_steps_change_nothing(case):
    net, head, trainer = _adaface_trainer([adaloss.Flatten(), adaloss.Linear(16, 16)])
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 1, 4, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 3])
    if case == "label":
        y[2] = 5
    elif case == "nan input":
        x[3, 0, 1, 1] = np.nan
    else:
        x, y = x[:0], y[:0]
    trainer.step(rng.normal(size=(4, 1, 4, 4)).astype(np.float32), np.array([0, 1, 2, 3]))
    before = _snapshot(net, head, trainer.optimizer)
    with pytest.raises(ValueError):
        trainer.step(x, y)
    _assert_unchanged(before, _snapshot(net, head, trainer.optimizer))
