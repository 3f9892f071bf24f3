"""adaloss.metrics against plain brute-force loops, scikit-learn and hand-worked cases."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from adaloss import metrics

SIZES = [(1, 1), (2, 2), (5, 3), (17, 16), (40, 7), (64, 1024)]   # (rows, chunk_size)


# ------------------------------------------------------------- references

def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_retrieval(q, q_lab, g=None, g_lab=None):
    """Each query ranks the gallery by (-cosine, gallery index), one at a time."""
    same = g is None
    if same:
        g, g_lab = q, q_lab
    sims = unit(q) @ unit(g).T
    p1, rp, ap_r, lone = [], [], [], 0
    for a in range(len(q)):
        items = [b for b in range(len(g)) if not (same and b == a)]
        ranked = sorted(items, key=lambda b: (-sims[a, b], b))
        r = sum(1 for b in items if g_lab[b] == q_lab[a])
        if r == 0:
            lone += 1
            continue
        rel = [g_lab[b] == q_lab[a] for b in ranked[:r]]
        p1.append(float(rel[0]))
        rp.append(sum(rel) / r)
        hits, total = 0, 0.0
        for i, is_rel in enumerate(rel, start=1):
            if is_rel:
                hits += 1
                total += hits / i
        ap_r.append(total / r)
    return np.mean(p1), np.mean(rp), np.mean(ap_r), lone


def brute_best_threshold(s, y):
    """Accept when score >= t; candidates: accept nothing, then midway below each
    distinct score (the lowest score itself last); the first most accurate."""
    distinct = sorted(set(s.tolist()), reverse=True)
    candidates = [np.inf]
    for k, u in enumerate(distinct):
        candidates.append((u + distinct[k + 1]) / 2 if k + 1 < len(distinct) else u)
    best, best_t = -1, None
    for t in candidates:
        correct = int(np.sum((s >= t) == y))
        if correct > best:
            best, best_t = correct, t
    return best_t


def brute_ten_fold(s, y, seed, folds=10):
    split = np.array_split(np.random.default_rng(seed).permutation(len(s)), folds)
    acc = []
    for f in range(folds):
        train = np.concatenate([split[i] for i in range(folds) if i != f])
        t = brute_best_threshold(s[train], y[train])
        acc.append(np.mean((s[split[f]] >= t) == y[split[f]]))
    return np.mean(acc), np.std(acc)


def brute_tar_at_far(s, y, far):
    best = 0.0
    for t in sorted(set(s.tolist())) + [np.inf]:
        fpr = sum(1 for a, b in zip(s, y) if a >= t and not b) / (len(y) - y.sum())
        tpr = sum(1 for a, b in zip(s, y) if a >= t and b) / y.sum()
        if fpr <= far:
            best = max(best, tpr)
    return best


def grid_embeddings(rng, n, dim=4):
    """Unit rows with entries +-1/sqrt(dim): every cosine is a multiple of 1/dim,
    exact in floating point, so similarities tie often and exactly."""
    return (rng.choice([-1.0, 1.0], size=(n, dim)) / np.sqrt(dim)).astype(np.float32)


# -------------------------------------------------------------- retrieval

@pytest.mark.parametrize("n,chunk", SIZES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_matches_brute_force(n, chunk, seed):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, 6)).astype(np.float32)
    labels = rng.integers(0, max(1, n // 3), size=n)
    if n < 2 or np.bincount(labels).max() < 2:
        labels[:2] = 0                             # at least one query with R >= 1
        if n < 2:
            with pytest.raises(ValueError, match="query_labels"):
                metrics.retrieval(emb, labels, chunk_size=chunk)
            return
    got = metrics.retrieval(emb, labels, chunk_size=chunk)
    p1, rp, ap_r, lone = brute_retrieval(emb, labels)
    np.testing.assert_allclose([got["precision_at_1"], got["r_precision"], got["map_at_r"]],
                               [p1, rp, ap_r], rtol=1e-12)
    assert got["num_lone_queries"] == lone
    assert got["num_evaluated"] == n - lone
    assert got["gallery_size"] == n - 1


@pytest.mark.parametrize("n,chunk", SIZES[2:])
@pytest.mark.parametrize("seed", [3, 4])
def test_retrieval_ties_match_brute_force(n, chunk, seed):
    # exact ties everywhere: order by gallery index decides, also across chunks
    rng = np.random.default_rng(seed)
    emb = grid_embeddings(rng, n, dim=4)
    labels = rng.integers(0, 3, size=n)
    labels[:2] = 0
    got = metrics.retrieval(emb, labels, chunk_size=chunk)
    p1, rp, ap_r, lone = brute_retrieval(emb, labels)
    np.testing.assert_allclose([got["precision_at_1"], got["r_precision"], got["map_at_r"]],
                               [p1, rp, ap_r], rtol=1e-12)
    assert got["num_lone_queries"] == lone


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("chunk", [1, 4, 1024])
@pytest.mark.parametrize("ties", [False, True])
def test_retrieval_separate_gallery_matches_brute_force(seed, chunk, ties):
    rng = np.random.default_rng(seed)
    if ties:
        q, g = grid_embeddings(rng, 13, 16), grid_embeddings(rng, 30, 16)
    else:
        q, g = (rng.standard_normal((13, 5)).astype(np.float32),
                rng.standard_normal((30, 5)).astype(np.float32))
    q_lab, g_lab = rng.integers(0, 6, 13), rng.integers(0, 5, 30)   # class 5: lone queries
    q_lab[0] = g_lab[0]
    got = metrics.retrieval(q, q_lab, g, g_lab, chunk_size=chunk)
    p1, rp, ap_r, lone = brute_retrieval(q, q_lab, g, g_lab)
    np.testing.assert_allclose([got["precision_at_1"], got["r_precision"], got["map_at_r"]],
                               [p1, rp, ap_r], rtol=1e-12)
    assert got["num_lone_queries"] == lone == int(np.sum(~np.isin(q_lab, g_lab)))
    assert got["gallery_size"] == 30 and not got["leave_one_out"]


def test_retrieval_hand_worked():
    # a=(1,0) b=(.8,.6) c=(.6,.8) d=(0,1) e=(-1,0), labels 0 0 1 1 0.
    # a: b .8 | c .6 | d 0 | e -1    R=2 -> rel 1 0:  P@1 1, RP 1/2, AP@R (1/1)/2 = 1/2
    # b: c .96 | a .8 | d .6 | e -.8 R=2 -> rel 0 1:  P@1 0, RP 1/2, AP@R (1/2)/2 = 1/4
    # c: b .96 | d .8 ...            R=1 -> rel 0:    0, 0, 0
    # d: c .8 | b .6 | a 0 = e 0     R=1 -> rel 1:    1, 1, 1
    # e: d 0 | c -.6 | b -.8 | a -1  R=2 -> rel 0 0:  0, 0, 0
    emb = np.array([[1, 0], [.8, .6], [.6, .8], [0, 1], [-1, 0]], np.float32)
    got = metrics.retrieval(emb, np.array([0, 0, 1, 1, 0]))
    assert got["precision_at_1"] == pytest.approx(2 / 5)
    assert got["r_precision"] == pytest.approx(2 / 5)
    assert got["map_at_r"] == pytest.approx((1 / 2 + 1 / 4 + 1) / 5)


def test_retrieval_ties_ordered_by_gallery_index():
    # both gallery items are orthogonal to the query (cosine exactly 0): the first wins
    q, q_lab = np.array([[1, 0]], np.float32), np.array([0])
    g = np.array([[0, 1], [0, -1]], np.float32)
    assert metrics.retrieval(q, q_lab, g, np.array([1, 0]))["precision_at_1"] == 0.0
    assert metrics.retrieval(q, q_lab, g, np.array([0, 1]))["precision_at_1"] == 1.0


def test_retrieval_whole_gallery_relevant():
    # R equals the gallery size: ranked (1,0) then (0,1), both relevant
    q = np.array([[1, 0]], np.float32)
    got = metrics.retrieval(q, np.array([0]), np.array([[0, 1], [1, 0]], np.float32),
                            np.array([0, 0]))
    assert (got["precision_at_1"], got["r_precision"], got["map_at_r"]) == (1.0, 1.0, 1.0)
    got = metrics.retrieval(q, np.array([0]), np.array([[0, 1], [1, 0]], np.float32),
                            np.array([0, 1]))
    assert (got["precision_at_1"], got["r_precision"], got["map_at_r"]) == (0.0, 0.0, 0.0)


def test_retrieval_class_of_one_excluded():
    # a=(1,0) b=(.8,.6) c=(.6,.8), labels 0 0 1: c is alone in its class (R = 0) and is
    # left out of all three averages, as pytorch-metric-learning does.
    # a: b .8 > c .6 -> right; b: c .96 > a .8 -> wrong.
    emb = np.array([[1, 0], [.8, .6], [.6, .8]], np.float32)
    got = metrics.retrieval(emb, np.array([0, 0, 1]))
    assert got["num_lone_queries"] == 1 and got["num_evaluated"] == 2
    assert got["precision_at_1"] == pytest.approx(0.5)
    assert got["r_precision"] == pytest.approx(0.5)
    assert got["map_at_r"] == pytest.approx(0.5)


def test_retrieval_cast_and_scale_invariant(rng):
    emb = rng.standard_normal((30, 4)).astype(np.float32)
    labels = rng.integers(0, 4, 30)
    a = metrics.retrieval(emb, labels)
    b = metrics.retrieval(emb.astype(np.float64) * 7.5, labels.astype(np.int32))
    assert a == pytest.approx(b, rel=1e-12)


# ------------------------------------------------------------- ROC and AUC

@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("levels", [None, 4, 20])      # None: no ties; else rounded scores
def test_roc_matches_sklearn(seed, levels):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    y = rng.random(n) < rng.uniform(0.1, 0.9)
    y[0], y[1] = True, False
    s = rng.standard_normal(n) + 0.8 * y
    if levels is not None:
        s = np.round(s * levels / 4) / levels
    fpr, tpr, thr = metrics.roc_curve(s, y)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_array_equal(fpr, sk_fpr)
    np.testing.assert_array_equal(tpr, sk_tpr)
    np.testing.assert_array_equal(thr[1:], sk_thr[1:])
    assert thr[0] == np.inf
    assert metrics.roc_auc(s, y) == pytest.approx(roc_auc_score(y, s), rel=1e-12, abs=1e-15)


def test_roc_ties_are_one_point():
    fpr, tpr, thr = metrics.roc_curve([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0])
    np.testing.assert_array_equal(fpr, [0, 1])
    np.testing.assert_array_equal(tpr, [0, 1])
    np.testing.assert_array_equal(thr, [np.inf, 0.5])


def test_all_equal_scores_auc_and_eer_half():
    s, y = np.full(10, 0.3), np.arange(10) % 2 == 0
    fpr, tpr, thr = metrics.roc_curve(s, y)
    assert metrics.roc_auc(s, y) == 0.5
    assert metrics.equal_error_rate(fpr, tpr) == 0.5
    assert metrics.tar_at_far(fpr, tpr, thr, 0.5, 5)["tar"] == 0.0


def test_perfect_separation_auc_one_eer_zero():
    s = np.array([0.9, 0.8, 0.7, 0.2, 0.1])
    y = np.array([1, 1, 1, 0, 0])
    fpr, tpr, thr = metrics.roc_curve(s, y)
    assert metrics.roc_auc(s, y) == 1.0
    assert metrics.equal_error_rate(fpr, tpr) == 0.0
    assert metrics.tar_at_far(fpr, tpr, thr, 0.5, 2)["tar"] == 1.0


def test_eer_interpolates_on_a_tied_segment():
    # genuine 1.0, 0.5; impostor 0.5, 0.0. ROC (0,0) (0,.5) (.5,1) (1,1); on the
    # diagonal segment FPR = 1 - TPR at (.25, .75)
    fpr, tpr, _ = metrics.roc_curve([1.0, 0.5, 0.5, 0.0], [1, 1, 0, 0])
    assert metrics.equal_error_rate(fpr, tpr) == pytest.approx(0.25)


@pytest.mark.parametrize("seed", range(3))
def test_tar_at_far_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(60, bool), np.zeros(1200, bool)]
    s = np.round(rng.standard_normal(len(y)) + 2.0 * y, 2)        # ties included
    fpr, tpr, thr = metrics.roc_curve(s, y)
    for far in (1e-2, 1e-3, 0.05):
        got = metrics.tar_at_far(fpr, tpr, thr, far, 1200)
        assert got["tar"] == pytest.approx(brute_tar_at_far(s, y, far))
        accepted = s >= got["threshold"]
        assert np.mean(accepted[~y]) <= far
        assert np.mean(accepted[y]) == pytest.approx(got["tar"])


def test_tar_at_far_needs_enough_impostors():
    fpr, tpr, thr = metrics.roc_curve([0.9, 0.1, 0.2], [1, 0, 0])
    got = metrics.tar_at_far(fpr, tpr, thr, 1e-3, 999)
    assert got["tar"] is None and "999 impostor pairs" in got["note"]
    assert metrics.tar_at_far(fpr, tpr, thr, 1e-3, 1000)["tar"] == 1.0


# ------------------------------------------------------------ verification

def brute_pairs(emb, labels):
    e = unit(emb)
    s, y = [], []
    for i in range(len(e)):
        for j in range(i + 1, len(e)):
            s.append(float(e[i] @ e[j]))
            y.append(labels[i] == labels[j])
    return np.array(s), np.array(y)


@pytest.mark.parametrize("seed", range(3))
def test_verification_matches_sklearn_and_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, 45)
    emb = (rng.standard_normal((45, 8)) + 1.5 * np.eye(8)[labels]).astype(np.float32)
    got = metrics.verification(emb, labels, seed=seed)
    s, y = brute_pairs(emb, labels)
    assert got["num_pairs"] == got["num_pairs_total"] == 45 * 44 // 2 and not got["sampled"]
    assert got["num_genuine"] == y.sum() and got["num_impostor"] == (~y).sum()
    assert got["roc_auc"] == pytest.approx(roc_auc_score(y, s), rel=1e-12)
    sk_fpr, sk_tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(got["roc"]["fpr"], sk_fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(got["roc"]["tpr"], sk_tpr, rtol=0, atol=1e-15)
    mean, std = brute_ten_fold(s, y, seed)
    assert got["accuracy_mean"] == pytest.approx(mean, abs=1e-12)
    assert got["accuracy_std"] == pytest.approx(std, abs=1e-12)
    fnr = 1 - sk_tpr
    k = np.argmin(np.abs(sk_fpr - fnr))             # the EER lies between neighbouring points
    lo, hi = sorted([sk_fpr[k], fnr[k]])
    assert lo - 1 / y.sum() <= got["eer"] <= hi + 1 / y.sum()
    far = got["tar_at_far"][0]
    assert far["far"] == 1e-2 and far["tar"] == pytest.approx(brute_tar_at_far(s, y, 1e-2))
    assert got["tar_at_far"][1]["tar"] is None     # fewer than 1,000 impostor pairs


@pytest.mark.parametrize("seed", [0, 5])
def test_verification_sampled_pairs(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, 60)
    emb = rng.standard_normal((60, 5)).astype(np.float32)
    got = metrics.verification(emb, labels, max_pairs=500, seed=seed)
    assert got["num_pairs"] == 500 and got["sampled"] and got["num_pairs_total"] == 1770
    i, j = metrics.sample_pairs(60, 500, seed)
    e = unit(emb)
    s = np.array([e[a] @ e[b] for a, b in zip(i, j)])
    y = labels[i] == labels[j]
    assert got["roc_auc"] == pytest.approx(roc_auc_score(y, s), rel=1e-12)
    again = metrics.verification(emb, labels, max_pairs=500, seed=seed)
    assert again["roc_auc"] == got["roc_auc"]


@pytest.mark.parametrize("n", [2, 3, 7, 50, 2001])
def test_sample_pairs_all_and_index_mapping(n):
    i, j = metrics.sample_pairs(n, max_pairs=None)
    ti, tj = np.triu_indices(n, 1)
    np.testing.assert_array_equal(i, ti)
    np.testing.assert_array_equal(j, tj)
    # the sampled path maps a row-major position to its pair: check all of them
    mi, mj = metrics._pair_from_index(np.arange(len(ti)), n)
    np.testing.assert_array_equal(mi, ti)
    np.testing.assert_array_equal(mj, tj)


def test_sample_pairs_distinct_and_seeded():
    i, j = metrics.sample_pairs(300, max_pairs=10_000, seed=1)
    assert len(i) == 10_000 and np.all(i < j) and i.min() >= 0 and j.max() < 300
    assert len(set(zip(i.tolist(), j.tolist()))) == 10_000
    i2, j2 = metrics.sample_pairs(300, max_pairs=10_000, seed=1)
    i3, _ = metrics.sample_pairs(300, max_pairs=10_000, seed=2)
    assert np.array_equal(i, i2) and np.array_equal(j, j2) and not np.array_equal(i, i3)


def test_ten_fold_separable_set_is_perfect():
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(5), 8)
    emb = (np.eye(16)[labels] * 10 + rng.normal(0, 0.5, (40, 16))).astype(np.float32)
    got = metrics.verification(emb, labels)
    assert got["accuracy_mean"] == 1.0 and got["accuracy_std"] == 0.0
    assert got["roc_auc"] == 1.0 and got["eer"] == 0.0
    assert got["tar_at_far"][0]["tar"] == 1.0       # 640 impostor pairs: FAR 1e-2 measurable


def test_identical_embeddings_give_chance():
    emb = np.ones((20, 3), np.float32)
    labels = np.arange(20) % 4
    got = metrics.verification(emb, labels)
    assert got["roc_auc"] == 0.5 and got["eer"] == 0.5
    # nothing separates the pairs: the best threshold says "impostor" to all
    # (190 pairs in 10 folds of 19: the fold means average to the impostor share)
    assert got["num_impostor"] == 150
    assert got["accuracy_mean"] == pytest.approx(150 / 190)


# ---------------------------------------------------------------- open set

def brute_open_set(known, k_lab, unknown, refs, ref_lab, far):
    def nearest(x):
        e, r = unit(x), unit(refs)
        scores, preds = [], []
        for row in e:
            sims = [float(row @ ref) for ref in r]
            best = max(range(len(r)), key=lambda c: (sims[c], -c))
            scores.append(sims[best])
            preds.append(ref_lab[best])
        return np.array(scores), np.array(preds)

    ks, kp = nearest(known)
    us, _ = nearest(unknown)
    t = np.quantile(us, 1 - far)
    auroc = roc_auc_score(np.r_[np.ones(len(ks)), np.zeros(len(us))], np.r_[ks, us])
    return auroc, np.mean(kp == k_lab), np.mean((kp == k_lab) & (ks > t)), t


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_open_set_matches_brute_force(seed, chunk):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 6)).astype(np.float32)
    k_lab = rng.integers(0, 4, 25)
    known = (w[k_lab] + rng.normal(0, 0.8, (25, 6))).astype(np.float32)
    unknown = rng.standard_normal((18, 6)).astype(np.float32)
    g_lab = rng.integers(0, 4, 30)
    gallery = (w[g_lab] + rng.normal(0, 0.8, (30, 6))).astype(np.float32)
    got = metrics.open_set(known, k_lab, unknown, class_weights=w, gallery_emb=gallery,
                           gallery_labels=g_lab, far=0.1, chunk_size=chunk)
    for name, refs, ref_lab in (("class_weights", w, np.arange(4)),
                                ("gallery", gallery, g_lab)):
        auroc, acc, acc_far, t = brute_open_set(known, k_lab, unknown, refs, ref_lab, 0.1)
        assert got[name]["auroc"] == pytest.approx(auroc, rel=1e-12)
        assert got[name]["closed_set_accuracy"] == pytest.approx(acc)
        assert got[name]["accuracy_at_far"] == pytest.approx(acc_far)
        assert got[name]["threshold"] == pytest.approx(t, rel=1e-12)


def test_open_set_hand_worked():
    # classes at (1,0) and (0,1). Known: (1,.1) class 0 right, (.1,1) class 1 right,
    # (1,.9) labelled 1 but nearer class 0: wrong. Unknown: (-1,-1) and (-1,.2), far
    # from both classes: every known image scores above every unknown one.
    w = np.eye(2, dtype=np.float32)
    known = np.array([[1, .1], [.1, 1], [1, .9]], np.float32)
    unknown = np.array([[-1, -1], [-1, .2]], np.float32)
    got = metrics.open_set(known, np.array([0, 1, 1]), unknown, class_weights=w, far=0.5)
    assert got["class_weights"]["auroc"] == 1.0
    assert got["class_weights"]["closed_set_accuracy"] == pytest.approx(2 / 3)
    assert got["class_weights"]["accuracy_at_far"] == pytest.approx(2 / 3)
    assert got["gallery"] is None


def test_open_set_threshold_is_strict_and_ties_go_to_the_lower_class():
    # classes along the axes of R^3. Unknown scores -1/sqrt3 < 1/sqrt2 < 1: the 0.5
    # quantile is exactly 1/sqrt2. Known (1,1,0) is as near class 0 as class 1 (class 0
    # wins) and scores exactly the threshold: right, but not accepted. Known (1,0,0):
    # right and accepted.
    w = np.eye(3, dtype=np.float32)
    unknown = np.array([[-1, -1, -1], [1, 1, 0], [1, 0, 0]], np.float32)
    known = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    got = metrics.open_set(known, np.array([0, 0]), unknown, class_weights=w, far=0.5)
    cw = got["class_weights"]
    assert cw["threshold"] == pytest.approx(1 / np.sqrt(2))
    assert cw["closed_set_accuracy"] == 1.0
    assert cw["accuracy_at_far"] == 0.5
    assert cw["far_achieved"] == pytest.approx(1 / 3)
    other = metrics.open_set(known, np.array([1, 0]), unknown, class_weights=w, far=0.5)
    assert other["class_weights"]["closed_set_accuracy"] == 0.5


# ---------------------------------------------------------- the whole lot

def test_evaluate_embeddings_is_plain_json_and_leaves_inputs_alone(rng):
    emb = rng.standard_normal((40, 6)).astype(np.float32)
    labels = rng.integers(0, 4, 40)
    unknown = rng.standard_normal((10, 6)).astype(np.float32)
    w = rng.standard_normal((4, 6)).astype(np.float32)
    before = (emb.copy(), labels.copy(), unknown.copy(), w.copy())
    out = metrics.evaluate_embeddings(emb, labels, unknown_emb=unknown, class_weights=w)
    for a, b in zip((emb, labels, unknown, w), before):
        np.testing.assert_array_equal(a, b)
    text = json.dumps(out, allow_nan=False)
    assert json.loads(text) == out

    def plain(value):
        if isinstance(value, dict):
            return all(plain(v) for v in value.values())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or type(value) in (bool, int, float, str)

    assert plain(out)
    assert out["retrieval"] == pytest.approx(metrics.retrieval(emb, labels))
    assert out["verification"]["roc_auc"] == metrics.verification(emb, labels)["roc_auc"]
    assert "roc" not in out["verification"]
    assert out["open_set"]["class_weights"]["auroc"] == pytest.approx(
        metrics.open_set(emb, labels, unknown, class_weights=w)["class_weights"]["auroc"])


# ------------------------------------------------------------ bad input

E = np.ones((4, 3), np.float32)
L = np.array([0, 0, 1, 1])


def with_row(value, row=2):
    x = E.copy()
    x[row] = value
    return x


@pytest.mark.parametrize("call,error,match", [
    (lambda: metrics.retrieval(E.astype(np.int64), L), TypeError, "query_emb: expected a floating"),
    (lambda: metrics.retrieval(E[0], L), ValueError, r"query_emb: expected a 2-D"),
    (lambda: metrics.retrieval(with_row(np.nan), L), ValueError, "query_emb: row 2 has a non-finite"),
    (lambda: metrics.retrieval(with_row(np.inf, 1), L), ValueError, "query_emb: row 1"),
    (lambda: metrics.retrieval(with_row(0.0), L), ValueError, "query_emb: row 2 has zero norm"),
    (lambda: metrics.retrieval(E, L.astype(float)), TypeError, "query_labels: expected integer"),
    (lambda: metrics.retrieval(E, L[:3]), ValueError, "query_labels: 3 labels but query_emb has 4"),
    (lambda: metrics.retrieval(E, L, E), ValueError, "gallery_emb, gallery_labels"),
    (lambda: metrics.retrieval(E, L, E[:, :2], L), ValueError, "gallery_emb: expected 3 columns"),
    (lambda: metrics.retrieval(E, L, chunk_size=0), ValueError, "chunk_size"),
    (lambda: metrics.retrieval(E, np.arange(4)), ValueError, "query_labels: no query"),
    (lambda: metrics.verification(E, np.zeros(4, int)), ValueError, "labels: .*2 classes"),
    (lambda: metrics.verification(E, np.arange(4)), ValueError, "labels: .*0 genuine"),
    (lambda: metrics.verification(E, L, max_pairs=0), ValueError, "max_pairs"),
    (lambda: metrics.verification(E, L, fars=(0.0,)), ValueError, "fars"),
    (lambda: metrics.verification(with_row(0.0, 3), L), ValueError, "emb: row 3 has zero norm"),
    (lambda: metrics.roc_curve([0.1, np.nan], [1, 0]), ValueError, "scores"),
    (lambda: metrics.roc_curve([0.1, 0.2], [1, 1]), ValueError, "is_genuine: expected both"),
    (lambda: metrics.roc_curve([0.1, 0.2], [1, 2]), ValueError, "is_genuine: expected booleans"),
    (lambda: metrics.roc_curve([0.1, 0.2], [1]), ValueError, "is_genuine: expected a 1-D"),
    (lambda: metrics.ten_fold_accuracy([0.1, 0.2], [1, 0], folds=3), ValueError, "folds"),
    (lambda: metrics.sample_pairs(1), ValueError, "n: expected"),
    (lambda: metrics.open_set(E, L, E), ValueError, "class_weights, gallery_emb"),
    (lambda: metrics.open_set(E, L, E, class_weights=E[:1]), ValueError,
     "known_labels: label 1 has no row in class_weights"),
    (lambda: metrics.open_set(E, L, E, class_weights=E, far=1.5), ValueError, "far"),
    (lambda: metrics.open_set(E, L, E, class_weights=with_row(0.0, 1)), ValueError,
     "class_weights: row 1 has zero norm"),
    (lambda: metrics.open_set(E, L, E[:, :2], class_weights=E), ValueError, "unknown_emb"),
    (lambda: metrics.open_set(E, L, E, gallery_emb=E, gallery_labels=L[:2]), ValueError,
     "gallery_labels: 2 labels"),
])
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_no_sklearn_or_scipy_in_the_library():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(metrics))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import)
                              else [ast.alias(node.module or "")])}
    assert imported <= {"__future__", "math", "numpy"}, imported


# ---------------------------------------------------------- size and speed

@pytest.mark.slow
def test_ten_thousand_embeddings():
    # not timed here (no timing assertions): run it alone and time it
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 10_000)
    centres = rng.standard_normal((10, 128))
    emb = (centres[labels] + 2.0 * rng.standard_normal((10_000, 128))).astype(np.float32)
    unknown = rng.standard_normal((2_000, 128)).astype(np.float32)
    out = metrics.evaluate_embeddings(emb, labels, unknown_emb=unknown,
                                      class_weights=centres.astype(np.float32))
    ver = out["verification"]
    assert ver["num_pairs"] == metrics.DEFAULT_MAX_PAIRS and ver["sampled"]
    assert ver["num_pairs_total"] == 10_000 * 9_999 // 2
    assert out["retrieval"]["num_evaluated"] == 10_000
    for value in (out["retrieval"]["map_at_r"], ver["roc_auc"], ver["eer"],
                  out["open_set"]["class_weights"]["auroc"]):
        assert 0.0 <= value <= 1.0
    assert ver["roc_auc"] > 0.5 and out["retrieval"]["precision_at_1"] > 0.1
