"""ArcFace's margin rules and the combined-margin head: central differences of
float64 NumPy definitions, a PyTorch re-implementation in the style of
insightface's code, the default rule against the paper ArcFace, validation, and
checkpoints."""
import hashlib
import io
import json
import math

import numpy as np
import pytest

import adaloss
from adaloss import checkpoint
from reference import finite_difference, normalize, rel_err
from test_gradcheck import aligned_batch

EPS = 1e-3          # the clip rule's eps: the head's eps, as the AdaFace paper head
RULES = ["fallback", "easy", "clip", "straight-through"]


# ------------------------------------------------------------ float64 definitions

def np_target(rule, t, m, margins=None, offset=None):
    """The target's f(c) for c = t in [-1, 1] (float64). `offset` fixes the
    straight-through margin cos(theta + m) - c at the base point."""
    theta = np.arccos(t)
    if rule == "combined":
        m1, m2, m3 = margins
        g = m1 * theta + m2
        k = np.floor(g / math.pi)
        return (-1.0) ** k * np.cos(g) - 2 * k - m3
    if rule == "fallback":
        return np.where(t > math.cos(math.pi - m), np.cos(theta + m), t - m * math.sin(m))
    if rule == "easy":
        return np.where(t > 0, np.cos(theta + m), t)
    if rule == "clip":
        return np.cos(np.clip(theta + m, EPS, math.pi - EPS))
    assert rule == "straight-through"
    return t + offset


def np_loss(rule, emb, weight, labels, s, m, margins=None, offset=None):
    rows = np.arange(len(labels))
    c = np.clip(normalize(emb) @ normalize(weight).T, -1, 1)
    logits = c.copy()
    logits[rows, labels] = np_target(rule, c[rows, labels], m, margins, offset)
    logits = s * logits
    logits -= logits.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(logits).sum(axis=1)) - logits[rows, labels]))


def st_offset(emb, weight, labels, m):
    """cos(theta + m) - cos theta at the given point, held constant: the
    straight-through rule's margin, which carries no gradient."""
    c = np.clip(normalize(emb) @ normalize(weight).T, -1, 1)[np.arange(len(labels)), labels]
    return np.cos(np.arccos(c) + m) - c


def make(rule, num_classes, dim, s, m=0.5, margins=None):
    if rule == "combined":
        m1, m2, m3 = margins
        return adaloss.CombinedMargin(num_classes, dim, s=s, m1=m1, m2=m2, m3=m3)
    return adaloss.ArcFace(num_classes, dim, s=s, m=m, rule=rule)


def fd_errors(rule, emb, weight, labels, s, m=0.5, margins=None):
    """(loss error, d_emb rel error, weight-grad rel error) of our head against
    central differences of the float64 definition. For straight-through the
    differences are of the rule's definition (target cos theta plus a margin
    held constant), not of its forward value cos(theta + m)."""
    head = make(rule, weight.shape[0], weight.shape[1], s, m, margins)
    head.weight = weight
    emb32 = emb.astype(np.float32)
    loss = head.forward(emb32, labels)
    head.zero_grad()
    d_emb = head.backward()
    e64, w64 = emb32.astype(np.float64), weight.astype(np.float64)
    offset = st_offset(e64, w64, labels, m) if rule == "straight-through" else None
    ref = np_loss(rule, e64, w64, labels, s, m, margins, offset)
    g_emb = finite_difference(lambda e: np_loss(rule, e, w64, labels, s, m, margins, offset), e64)
    g_w = finite_difference(lambda w: np_loss(rule, e64, w, labels, s, m, margins, offset), w64)
    return abs(loss - ref) / max(1.0, abs(ref)), rel_err(d_emb, g_emb), \
        rel_err(head.weight_grad, g_w)


def check_fd(rule, emb, weight, labels, s, m=0.5, margins=None, rtol=5e-3):
    loss_err, emb_err, w_err = fd_errors(rule, emb, weight, labels, s, m, margins)
    assert loss_err < 1e-4, ("loss", loss_err)
    assert emb_err < rtol, ("emb", emb_err)
    assert w_err < rtol, ("weight", w_err)


M = 0.5
# theta near 0, near pi - m (either side), past it, near pi
ANGLES = [0.02, 0.6, math.pi - M - 0.05, math.pi - M + 0.05, math.pi - 0.2, math.pi - 0.02]
# per rule, where its own edges are: easy around cos theta = 0 (0.05 rad off the
# kink), clip either side of theta + m = pi - eps
EDGES = {"fallback": [], "easy": [math.pi / 2 - 0.05, math.pi / 2 + 0.05],
         "clip": [math.pi - M - EPS - 0.02, math.pi - M - EPS + 0.02],
         "straight-through": []}


@pytest.mark.parametrize("rule", RULES)
def test_rule_gradients_random(rule, rng):
    n, c, d = 12, 5, 8
    check_fd(rule, rng.normal(size=(n, d)), rng.normal(size=(c, d)).astype(np.float32),
             rng.integers(0, c, n), s=8.0, rtol=2e-3)


@pytest.mark.parametrize("rule,angle", [(r, a) for r in RULES for a in ANGLES + EDGES[r]])
def test_rule_gradients_at_edges(rule, angle, rng):
    weight = rng.normal(size=(4, 6)).astype(np.float32)
    labels = rng.integers(0, 4, 8)
    check_fd(rule, aligned_batch(rng, weight, labels, angle), weight, labels, s=4.0)


def test_clip_lower_bound(rng):
    """With m = 0 the angle itself is clipped below at eps: theta = 5e-4 clips
    (target constant cos(eps), no gradient), theta = 0.05 does not."""
    weight = rng.normal(size=(4, 6)).astype(np.float32)
    labels = rng.integers(0, 4, 8)
    for angle in (5e-4, 0.05):
        check_fd("clip", aligned_batch(rng, weight, labels, angle), weight, labels, s=4.0, m=0.0)


COMBINED = [(1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (2.0, 0.0, 0.0), (4.0, 0.0, 0.0),
            (1.0, 0.3, 0.2), (1.5, 0.4, 0.1)]


def _pi_crossing(m1, m2):
    return (math.pi - m2) / m1     # the theta where m1 theta + m2 = pi


@pytest.mark.parametrize("margins", COMBINED)
def test_combined_gradients_random(margins, rng):
    n, c, d = 12, 5, 8
    check_fd("combined", rng.normal(size=(n, d)), rng.normal(size=(c, d)).astype(np.float32),
             rng.integers(0, c, n), s=8.0, margins=margins, rtol=2e-3)


# either side of m1 theta + m2 = pi (k = 0 and k = 1) where theta reaches it,
# and theta near 0 and pi
COMBINED_EDGES = [(margins, angle) for margins in COMBINED
                  for angle in (_pi_crossing(*margins[:2]) - 0.05,
                                _pi_crossing(*margins[:2]) + 0.05, 0.02, math.pi - 0.02)
                  if 0 < angle < math.pi]


@pytest.mark.parametrize("margins,angle", COMBINED_EDGES)
def test_combined_gradients_at_edges(margins, angle, rng):
    weight = rng.normal(size=(4, 6)).astype(np.float32)
    labels = rng.integers(0, 4, 8)
    check_fd("combined", aligned_batch(rng, weight, labels, angle), weight, labels, s=4.0,
             margins=margins)


# ------------------------------------------------------------ forward values

def target_values(head, angles):
    """f(theta) of the head for each angle, read back from the loss: with two
    classes, the non-target at cos = 0 and s = 1, loss = log(1 + exp(-f))."""
    values = []
    for angle in angles:
        emb = np.array([[math.cos(angle), math.sin(angle), 0.0]], np.float32)
        loss = head.forward(emb, np.array([0]))
        values.append(-math.log(math.expm1(loss)))
    return np.array(values)


def unit_head(head):
    head.weight = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    return head


GRID = np.linspace(0.01, math.pi - 0.01, 157)


@pytest.mark.parametrize("rule", RULES)
def test_rule_values_follow_the_definition(rule):
    """Every rule's forward value over theta in (0, pi); straight-through's is
    cos(theta + m) everywhere, rising again past pi - m."""
    got = target_values(unit_head(adaloss.ArcFace(2, 3, s=1.0, m=M, rule=rule)), GRID)
    t = np.cos(GRID)
    want = np_target(rule, t, M, offset=np.cos(GRID + M) - t)
    assert np.max(np.abs(got - want)) < 2e-5


@pytest.mark.parametrize("margins", COMBINED)
def test_combined_is_continuous_and_decreasing_past_pi(margins):
    """Past m1 theta + m2 = pi the target keeps decreasing (SphereFace's psi)
    instead of rising again as a plain cosine would, and has no jump at pi."""
    head = unit_head(adaloss.CombinedMargin(2, 3, s=1.0, m1=margins[0], m2=margins[1],
                                            m3=margins[2]))
    got = target_values(head, GRID)
    assert np.max(np.abs(got - np_target("combined", np.cos(GRID), 0.0, margins))) < 3e-5
    assert np.all(np.diff(got) < 1e-5), "not decreasing in theta"
    plain = np.cos(margins[0] * GRID + margins[1]) - margins[2]
    below = margins[0] * GRID + margins[1] <= math.pi
    assert np.max(np.abs(got[below] - plain[below])) < 3e-5
    crossing = _pi_crossing(*margins[:2])
    if 0 < crossing < math.pi - 1e-3:
        side = target_values(head, [crossing - 1e-3, crossing + 1e-3])
        past = margins[0] * GRID + margins[1] > math.pi + 1e-3
        assert np.all(plain[past] > got[past])   # a plain cosine would rise again
        # both sides within the slope's reach of -1 - m3 (f = -1 - m3 at g = pi)
        assert np.max(np.abs(side + 1 + margins[2])) < 1e-4 + margins[0] * 1e-3
    else:
        assert below.all()


# ------------------------------------------------------------ PyTorch

def torch_head(torch, rule, emb, weight, labels, s, m=0.5, margins=None):
    """insightface-style heads in float64: (plain logits, loss, d_emb, d_weight)."""
    F = torch.nn.functional
    e = torch.tensor(emb, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(weight, dtype=torch.float64, requires_grad=True)
    lab = torch.tensor(labels)
    cos = F.linear(F.normalize(e), F.normalize(w)).clamp(-1, 1)
    idx = torch.arange(len(labels))
    t = cos[idx, lab]
    if rule == "combined":
        m1, m2, m3 = margins
        g = m1 * torch.acos(t) + m2
        k = torch.floor(g.detach() / math.pi)
        final = (-1.0) ** k * torch.cos(g) - 2 * k - m3
    elif rule == "clip":   # the AdaFace code's treatment of its angle
        final = torch.cos(torch.clip(torch.acos(t) + m, min=EPS, max=math.pi - EPS))
    elif rule == "straight-through":
        # arcface_torch adds the margin to arccos(logits) under no_grad, in
        # place: the value is cos(theta + m) and the gradient that of cos theta
        with torch.no_grad():
            margin = torch.cos(torch.acos(t) + m) - t
        final = t + margin
    else:              # insightface's ArcFace with and without easy_margin
        sin_theta = torch.sqrt(1.0 - t * t)
        cos_theta_m = t * math.cos(m) - sin_theta * math.sin(m)
        if rule == "easy":
            final = torch.where(t > 0, cos_theta_m, t)
        else:
            final = torch.where(t > math.cos(math.pi - m), cos_theta_m,
                                t - math.sin(math.pi - m) * m)
    logits = cos.index_put((idx, lab), final) * s
    loss = F.cross_entropy(logits, lab)
    loss.backward()
    return (s * cos).detach().numpy(), loss.item(), e.grad.numpy(), w.grad.numpy()


def torch_errors(torch, rule, emb, weight, labels, s=64.0, m=0.5, margins=None):
    """Worst errors of ours (float32) against torch (float64): logits (absolute),
    loss (relative), d_emb and weight grad (relative to the largest entry)."""
    head = make(rule, weight.shape[0], weight.shape[1], s, m, margins)
    head.weight = weight
    emb32 = emb.astype(np.float32)
    loss = head.forward(emb32, labels)
    head.zero_grad()
    d_emb = head.backward()
    logits = head.logits(emb32)
    t_logits, t_loss, t_emb, t_w = torch_head(torch, rule, emb32.astype(np.float64),
                                              weight.astype(np.float64), labels, s, m, margins)
    return {"logits": float(np.max(np.abs(logits - t_logits))),
            "loss": abs(loss - t_loss) / max(1.0, abs(t_loss)),
            "d_emb": rel_err(d_emb, t_emb), "weight": rel_err(head.weight_grad, t_w)}


def torch_batches(rng, angles):
    """A random batch and batches aligned at the given target angles (class
    weights of different norms, embeddings of norm 3)."""
    weight = (rng.normal(size=(10, 16)) * rng.uniform(0.5, 2, size=(10, 1))).astype(np.float32)
    labels = rng.integers(0, 10, 32)
    yield rng.normal(size=(32, 16)), weight, labels
    for angle in angles:
        yield aligned_batch(rng, weight, labels, angle), weight, labels


# float32 (ours) against float64 (torch) at s = 64: logits |difference| <= 1e-4,
# loss relative 1e-5, gradients 5e-5 relative to their largest entry (the worst
# seen: 1.3e-5, 9e-7 and 5e-6)
TORCH_TOL = {"logits": 1e-4, "loss": 1e-5, "d_emb": 5e-5, "weight": 5e-5}


def _assert_torch(errors):
    for key, tol in TORCH_TOL.items():
        assert errors[key] < tol, (key, errors[key])


@pytest.mark.parametrize("rule", RULES)
def test_rules_match_pytorch(torch, rule, rng):
    for emb, weight, labels in torch_batches(rng, ANGLES[1:] + EDGES[rule]):
        _assert_torch(torch_errors(torch, rule, emb, weight, labels))


@pytest.mark.parametrize("margins", COMBINED)
def test_combined_matches_pytorch(torch, margins, rng):
    crossing = _pi_crossing(*margins[:2])
    angles = [0.6, math.pi - 0.2] + [a for a in (crossing - 0.05, crossing + 0.05)
                                     if 0 < a < math.pi]
    for emb, weight, labels in torch_batches(rng, angles):
        _assert_torch(torch_errors(torch, "combined", emb, weight, labels, margins=margins))


# ------------------------------------------------------------ equivalences

def _run(head, weight, emb, labels):
    head.weight = weight
    loss = head.forward(emb.astype(np.float32), labels)
    head.zero_grad()
    return loss, head.backward(), head.weight_grad.copy()


def test_default_rule_is_the_paper_arcface_bit_for_bit(rng):
    weight = rng.normal(size=(10, 16)).astype(np.float32)
    labels = rng.integers(0, 10, 64)
    for emb in [rng.normal(size=(64, 16))] + [aligned_batch(rng, weight, labels, a)
                                              for a in ANGLES]:
        default = _run(adaloss.ArcFace(10, 16), weight, emb, labels)
        explicit = _run(adaloss.ArcFace(10, 16, rule="fallback"), weight, emb, labels)
        assert default[0] == explicit[0]
        assert np.array_equal(default[1], explicit[1])
        assert np.array_equal(default[2], explicit[2])
    assert adaloss.ArcFace(10, 16).rule == "fallback"


def test_combined_covers_arcface_and_cosface(rng):
    weight = rng.normal(size=(10, 16)).astype(np.float32)
    labels = rng.integers(0, 10, 48)
    # ArcFace's cos(theta + m) where no fallback applies (theta + m < pi)
    for angle in (0.1, 1.0, 2.0, math.pi - M - 0.1):
        emb = aligned_batch(rng, weight, labels, angle)
        arc = _run(adaloss.ArcFace(10, 16, m=M), weight, emb, labels)
        comb = _run(adaloss.CombinedMargin(10, 16, m1=1.0, m2=M, m3=0.0), weight, emb, labels)
        assert abs(arc[0] - comb[0]) < 1e-4 * max(1.0, abs(arc[0]))
        assert rel_err(comb[1], arc[1]) < 1e-3 and rel_err(comb[2], arc[2]) < 1e-3
    emb = rng.normal(size=(48, 16))
    cos = _run(adaloss.CosFace(10, 16, m=0.35), weight, emb, labels)
    comb = _run(adaloss.CombinedMargin(10, 16, m1=1.0, m2=0.0, m3=0.35), weight, emb, labels)
    assert abs(cos[0] - comb[0]) < 1e-5 * max(1.0, abs(cos[0]))
    assert rel_err(comb[1], cos[1]) < 1e-4 and rel_err(comb[2], cos[2]) < 1e-4


# ------------------------------------------------------------ validation

@pytest.mark.parametrize("make_bad,error,match", [
    (lambda: adaloss.ArcFace(10, 8, rule="easyy"), ValueError, r"rule: expected one of .*'easyy'"),
    (lambda: adaloss.ArcFace(10, 8, rule=None), ValueError, "rule"),
    (lambda: adaloss.ArcFace(10, 8, rule="easy", variant="report"), ValueError,
     r"rule: only the paper ArcFace"),
    (lambda: adaloss.CombinedMargin(10, 8, m1=0), ValueError, r"m1: expected .*\(0, 10\], got 0"),
    (lambda: adaloss.CombinedMargin(10, 8, m1=-1.0), ValueError, "m1"),
    (lambda: adaloss.CombinedMargin(10, 8, m2=float("nan")), ValueError,
     r"m2: expected a finite number .* got nan"),
    (lambda: adaloss.CombinedMargin(10, 8, m3=float("inf")), ValueError, "m3"),
    (lambda: adaloss.CombinedMargin(10, 8, m2="0.5"), TypeError, "m2"),
    (lambda: adaloss.CombinedMargin(10, 8, s=float("nan")), ValueError, "s"),
])
def test_bad_settings_raise_naming_the_argument(make_bad, error, match):
    with pytest.raises(error, match=match):
        make_bad()


def test_report_variant_keeps_the_fallback_rule():
    head = adaloss.ArcFace(10, 8, variant="report", rule="fallback")
    assert head.rule == "fallback" and "rule='fallback'" in repr(head)


def test_settings_are_read_only():
    """The C head holds them: an assignment that would not reach it is refused."""
    with pytest.raises(AttributeError):
        adaloss.ArcFace(10, 8).rule = "easy"
    head = adaloss.CombinedMargin(10, 8, m1=1.5, m2=0.25, m3=0.125)
    assert (head.m1, head.m2, head.m3) == (1.5, 0.25, 0.125)
    with pytest.raises(AttributeError):
        head.m2 = 0.0


@pytest.mark.parametrize("rule", RULES + ["combined"])
def test_exactly_parallel_and_opposite_vectors_stay_finite(rule):
    """cos theta = +-1 exactly (sin theta = 0: the slope's floor)."""
    head = make(rule, 2, 2, 64.0, margins=(2.0, 0.3, 0.1))
    head.weight = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    emb = np.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 3.0], [0.0, -3.0]], np.float32)
    loss = head.forward(emb, np.array([0, 0, 1, 1]))
    head.zero_grad()
    d_emb = head.backward()
    assert np.isfinite(loss) and np.all(np.isfinite(d_emb))
    assert np.all(np.isfinite(head.weight_grad))


# ------------------------------------------------------------ checkpoints

def _parts(head):
    net = adaloss.Sequential([adaloss.Flatten(), adaloss.Linear(16, 8)], input_shape=(1, 4, 4))
    return net, head, adaloss.Adam(net.parameters() + head.parameters())


def _rewrite_meta(path, edit):
    """Rewrite a checkpoint's meta (as an older adaloss would have written it)."""
    arrays, meta = checkpoint.read(path)
    edit(meta)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    payload = buf.getvalue()
    checkpoint.atomic_write(path, checkpoint.MAGIC + checkpoint.VERSION.to_bytes(4, "little")
                            + hashlib.sha256(payload).digest() + payload)


@pytest.mark.parametrize("same,other", [
    (lambda: adaloss.ArcFace(5, 8, rule="easy"), lambda: adaloss.ArcFace(5, 8)),
    (lambda: adaloss.CombinedMargin(5, 8, m1=1.0, m2=0.3, m3=0.2),
     lambda: adaloss.CombinedMargin(5, 8, m1=1.0, m2=0.3, m3=0.25)),
])
def test_checkpoint_carries_rule_and_margins(same, other, tmp_path, rng):
    net, head, opt = _parts(same())
    trainer = adaloss.Trainer(net, head, opt)
    x, y = rng.normal(size=(6, 1, 4, 4)).astype(np.float32), rng.integers(0, 5, 6)
    assert np.isfinite(trainer.step(x, y))
    path = tmp_path / "h.ckpt"
    checkpoint.save(path, net, head, opt, epoch=1)
    net2, head2, opt2 = _parts(same())
    assert checkpoint.load(path, net2, head2, opt2) == {"epoch": 1}
    assert np.array_equal(head2.weight, head.weight)
    with pytest.raises(checkpoint.CheckpointError, match="architecture"):
        checkpoint.load(path, *_parts(other()))


def test_old_arcface_checkpoint_loads_as_fallback(tmp_path):
    path = tmp_path / "old.ckpt"
    checkpoint.save(path, *_parts(adaloss.ArcFace(5, 8)))
    _rewrite_meta(path, lambda meta: meta["architecture"]["head"].pop("rule"))
    assert "rule" not in checkpoint.read(path)[1]["architecture"]["head"]
    checkpoint.load(path, *_parts(adaloss.ArcFace(5, 8)))
    with pytest.raises(checkpoint.CheckpointError, match="architecture"):
        checkpoint.load(path, *_parts(adaloss.ArcFace(5, 8, rule="clip")))


@pytest.mark.parametrize("make", [
    lambda: adaloss.ArcFace(5, 8, rule="easy"),
    lambda: adaloss.ArcFace(5, 8, rule="straight-through"),
    lambda: adaloss.CombinedMargin(5, 8, m1=1.0, m2=0.3, m3=0.2),
], ids=["arcface-easy", "arcface-straight-through", "combined"])
def test_pickle_and_deepcopy_keep_the_margin(make):
    """A pickled or deep-copied head computes the same loss: its rule and margins
    travel with it (the defaults would give another loss)."""
    import copy
    import pickle

    head = make()
    emb = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    labels = np.arange(6) % 5
    for twin in (pickle.loads(pickle.dumps(head)), copy.deepcopy(head)):
        assert repr(twin) == repr(head)
        assert twin.forward(emb, labels) == head.forward(emb, labels)
