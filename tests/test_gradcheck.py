"""Every layer and head variant: the C gradient against central finite
differences of an independent float64 NumPy forward."""
import math

import numpy as np
import pytest

import adaloss
from reference import (make_head as _make_head, finite_difference, np_conv2d, np_head_loss, np_maxpool, normalize,
                       rel_err)

HEADS = [("softmax", "paper"), ("cosface", "paper"), ("arcface", "paper"), ("arcface", "report"),
         ("adaface", "paper"), ("adaface", "report")]



def check_head(kind, variant, emb, weight, labels, s, m, rtol=2e-3):
    head = make_head(kind, variant, weight.shape[0], weight.shape[1], s, m)
    head.weight = weight
    emb32 = emb.astype(np.float32)
    loss = head.forward(emb32, labels)
    head.zero_grad()
    d_emb = head.backward()
    q = head.last_batch()["quality"].astype(np.float64)
    running = None
    if kind == "adaface" and variant == "paper":
        running = (head.running_mean, head.running_std)
    w64, e64 = weight.astype(np.float64), emb32.astype(np.float64)
    quality = q if kind == "adaface" and variant == "report" else None
    if running is not None:
        # q carries no gradient: fix it at its value, from the updated statistics
        norms = np.clip(np.linalg.norm(e64, axis=1), 0.001, 100)
        quality = np.clip((norms - running[0]) / (running[1] + 1e-3) * 0.333, -1, 1)
        assert np.max(np.abs(quality - q)) < 1e-5
    ref = np_head_loss(kind, variant, e64, w64, labels, s, m, quality=quality, running=running)
    assert abs(loss - ref) <= 1e-4 * max(1.0, abs(ref)), (loss, ref)
    g_emb = finite_difference(lambda e: np_head_loss(kind, variant, e, w64, labels, s, m,
                                                     quality=quality, running=running), e64)
    g_w = finite_difference(lambda w: np_head_loss(kind, variant, e64, w, labels, s, m,
                                                   quality=quality, running=running), w64)
    assert rel_err(d_emb, g_emb) < rtol, ("emb", rel_err(d_emb, g_emb))
    assert rel_err(head.weight_grad, g_w) < rtol, ("weight", rel_err(head.weight_grad, g_w))
    return head


@pytest.mark.parametrize("kind,variant", HEADS)
def test_head_gradients_random(kind, variant, rng):
    n, c, d = 12, 5, 8
    scale = 0.15 if (kind, variant) == ("arcface", "report") else 1.0  # keep e.w inside the clamp
    emb = rng.normal(size=(n, d)) * scale
    weight = (rng.normal(size=(c, d)) * scale).astype(np.float32)
    if (kind, variant) == ("adaface", "paper"):
        emb *= 5.0  # norms around the running mean's scale
    check_head(kind, variant, emb, weight, rng.integers(0, c, n), s=8.0, m=0.4)


def aligned_batch(rng, weight, labels, angle):
    """Embeddings at a chosen angle from their class weight."""
    wn = normalize(weight.astype(np.float64))
    emb = []
    for y in labels:
        other = rng.normal(size=weight.shape[1])
        other -= other @ wn[y] * wn[y]
        other /= np.linalg.norm(other)
        emb.append(math.cos(angle) * wn[y] + math.sin(angle) * other)
    return np.array(emb) * 3.0


@pytest.mark.parametrize("angle", [0.02, 0.3, math.pi - 0.6, math.pi - 0.2, math.pi - 0.02])
def test_arcface_paper_edges(angle, rng):
    """theta close to 0 (cos -> 1) and theta + m > pi (the fall-back branch)."""
    weight = rng.normal(size=(4, 6)).astype(np.float32)
    labels = rng.integers(0, 4, 8)
    emb = aligned_batch(rng, weight, labels, angle)
    check_head("arcface", "paper", emb, weight, labels, s=4.0, m=0.5, rtol=5e-3)


@pytest.mark.parametrize("variant", ["paper", "report"])
@pytest.mark.parametrize("angle", [0.005, 0.2, math.pi - 0.2, math.pi - 0.005])
def test_adaface_edges(variant, angle, rng):
    """cos near +-1: inside and beyond the clamps (zero gradient beyond)."""
    weight = rng.normal(size=(4, 6)).astype(np.float32)
    labels = rng.integers(0, 4, 8)
    emb = aligned_batch(rng, weight, labels, angle)
    check_head("adaface", variant, emb, weight, labels, s=4.0, m=0.4, rtol=5e-3)


def test_arcface_report_clamp_zero_gradient(rng):
    """Outside [-1, 1] the report's clamp passes no gradient."""
    weight = rng.normal(size=(3, 4)).astype(np.float32) * 3
    emb = rng.normal(size=(6, 4)) * 3   # most e.w far outside [-1, 1]
    labels = rng.integers(0, 3, 6)
    head = check_head("arcface", "report", emb, weight, labels, s=4.0, m=0.5)
    dots = emb.astype(np.float32) @ weight.T
    outside = np.abs(dots) > 1
    assert outside.any()
    assert np.all(head.weight_grad[:, :][np.all(outside, axis=0)] == 0)


def net_check(layers, x, rtol=2e-3, ref_forward=None):
    """C gradients of sum(out * r) for a one-layer net against finite differences."""
    net = adaloss.Sequential(layers, input_shape=x.shape[1:])
    out = net.forward(x.astype(np.float32))
    r = np.random.default_rng(5).normal(size=out.shape)
    net.zero_grad()
    dx = net.backward(r.astype(np.float32))
    params = {p.name: p for p in net.parameters()}
    x64 = x.astype(np.float64)
    state = {k: p.data.astype(np.float64) for k, p in params.items()}

    def f_x(xv):
        return float(np.sum(ref_forward(xv, state).reshape(out.shape) * r))

    assert rel_err(out, ref_forward(x64, state).reshape(out.shape)) < 1e-5
    assert rel_err(dx.reshape(x.shape), finite_difference(f_x, x64)) < rtol
    for name, p in params.items():
        def f_p(pv, name=name):
            st = dict(state)
            st[name] = pv
            return float(np.sum(ref_forward(x64, st).reshape(out.shape) * r))
        assert rel_err(p.grad, finite_difference(f_p, state[name])) < rtol, name


@pytest.mark.parametrize("k,pad", [(3, 1), (3, 0), (1, 0), (5, 2), (5, 1)])
def test_conv2d_gradients(k, pad, rng):
    x = rng.normal(size=(2, 3, 6, 5))
    net_check([adaloss.Conv2d(3, 4, k, padding=pad)], x,
              ref_forward=lambda xv, st: np_conv2d(xv, st["0.weight"], st["0.bias"], pad))


def test_linear_gradients(rng):
    x = rng.normal(size=(5, 7))
    net_check([adaloss.Linear(7, 3)], x,
              ref_forward=lambda xv, st: xv @ st["0.weight"].T + st["0.bias"])


def test_relu_gradients(rng):
    x = rng.normal(size=(4, 2, 3, 3))
    x[np.abs(x) < 1e-3] = 0.5  # keep finite differences off the kink
    net_check([adaloss.ReLU()], x, ref_forward=lambda xv, st: np.maximum(xv, 0))


def test_conv_relu_fused_gradients(rng):
    x = rng.normal(size=(2, 2, 5, 5))
    net_check([adaloss.Conv2d(2, 3, 3, padding=1), adaloss.ReLU()], x,
              ref_forward=lambda xv, st: np.maximum(
                  np_conv2d(xv, st["0.weight"], st["0.bias"], 1), 0))


@pytest.mark.parametrize("shape", [(2, 3, 6, 6), (2, 2, 7, 5)])
def test_maxpool_gradients(shape, rng):
    x = rng.normal(size=shape)
    net_check([adaloss.MaxPool2d(2)], x, ref_forward=lambda xv, st: np_maxpool(xv))


def test_flatten_l2norm_gradients(rng):
    x = rng.normal(size=(4, 2, 3, 2))
    net_check([adaloss.Flatten(), adaloss.L2Normalize()], x,
              ref_forward=lambda xv, st: normalize(xv.reshape(len(xv), -1)))


def test_linear_relu_l2norm_gradients(rng):
    x = rng.normal(size=(5, 6))
    net_check([adaloss.Linear(6, 4), adaloss.ReLU(), adaloss.Linear(4, 3), adaloss.L2Normalize()],
              x, ref_forward=lambda xv, st: normalize(
                  np.maximum(xv @ st["0.weight"].T + st["0.bias"], 0) @ st["2.weight"].T
                  + st["2.bias"]))


def test_gemm_against_reference(rng):
    from adaloss import _core
    for ta in (0, 1):
        for tb in (0, 1):
            a = rng.normal(size=(70, 300) if not ta else (300, 70)).astype(np.float32)
            b = rng.normal(size=(300, 90) if not tb else (90, 300)).astype(np.float32)
            got = _core.gemm(a, b, ta, tb, 0)
            ref = _core.gemm(a, b, ta, tb, 1)
            exact = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b)
            assert rel_err(ref, exact) < 1e-6
            assert rel_err(got, exact) < 1e-5


def make_head(kind, variant, num_classes, dim, s, m, h=0.333):
    return _make_head(adaloss, kind, variant, num_classes, dim, s, m, h)
