"""Embedding metrics: retrieval, pair verification and open-set recognition.

Margin losses exist to make embeddings that work for classes the network never
saw; test accuracy of the trained classifier does not measure that. These
functions measure the embeddings themselves, from arrays of embeddings
(`(N, D)`, floating point, normally float32) and integer labels (`(N,)`).

Conventions shared by every function:

- **Similarity** is the cosine $s(a, b) = a \\cdot b / (\\lVert a\\rVert\\,\\lVert b\\rVert)$,
  computed in float64 from the (float32) input. Higher means more similar.
- **Input checks** raise before anything is computed, naming the argument:
  `TypeError` for a non-floating embedding array or non-integer labels,
  `ValueError` for a wrong shape, a length mismatch, a non-finite value or a
  zero-norm row (the message gives the first offending row: a cosine is
  undefined for a zero vector, so such rows are never silently dropped).
- **Memory**: similarities are computed `chunk_size` query rows at a time
  (default 1,024), so 10,000 x 10,000 never holds more than a few
  `chunk_size x N` float64 blocks (about 0.3 GB at the default).
- NumPy only: no scikit-learn or SciPy, at import or at run time.

`evaluate_embeddings` runs everything and returns plain Python numbers for a
results file.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["retrieval", "verification", "sample_pairs", "roc_curve", "roc_auc",
           "equal_error_rate", "tar_at_far", "ten_fold_accuracy", "open_set",
           "evaluate_embeddings", "jsonable"]

DEFAULT_CHUNK = 1024
DEFAULT_MAX_PAIRS = 1_000_000
# A test image whose angle to its own class weight is this many degrees or
# more sits in ArcFace's trap (m = 0.5 pulls embeddings towards pi - m, about
# 151 degrees): the threshold the figures and the study's "trapped" share use.
TRAPPED_DEG = 140.0
_PAIR_CHUNK = 1 << 16


# --------------------------------------------------------------------- checks

def _normalized(x, name: str) -> np.ndarray:
    """(N, D) floating array -> float64 rows of unit norm, or a clear error."""
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array (float32), got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (N, D), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one row and one column, got shape {arr.shape}")
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        raise ValueError(f"{name}: row {row} has a non-finite value (NaN or inf)")
    out = arr.astype(np.float64)
    norms = np.linalg.norm(out, axis=1)
    bad = (norms == 0) | ~np.isfinite(norms)
    if bad.any():
        row = int(np.argmax(bad))
        what = "zero norm" if norms[row] == 0 else "a norm that overflows float64"
        raise ValueError(f"{name}: row {row} has {what}; its cosine similarity is undefined")
    out /= norms[:, None]
    return out


def _labels(y, n: int, name: str, rows_name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of labels, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer labels, got dtype {arr.dtype}")
    if len(arr) != n:
        raise ValueError(f"{name}: {len(arr)} labels but {rows_name} has {n} rows")
    return arr.astype(np.int64)


def _scores(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu" or arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of real scores, got dtype {arr.dtype} "
                         f"and shape {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: element {int(np.argmin(np.isfinite(arr)))} is not finite")
    return arr


def _binary(y, n: int, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"{name}: expected a 1-D array of {n} elements, got shape {arr.shape}")
    if arr.dtype.kind == "b":
        return arr
    if arr.dtype.kind not in "iu" or not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name}: expected booleans or 0/1 integers (1 = genuine/positive)")
    return arr.astype(bool)


def _both_classes(y: np.ndarray, name: str) -> tuple:
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        raise ValueError(f"{name}: expected both positives and negatives, got {pos} positive "
                         f"and {neg} negative")
    return pos, neg


def _chunk(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
            or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    return int(chunk_size)


def _rate(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) \
            or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name}: expected a number strictly between 0 and 1, got {value!r}")
    return float(value)


# ------------------------------------------------------------------ retrieval

def _top_k(neg_sims: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k most similar items of each row, in retrieval order.

    `neg_sims` holds minus the similarities (it is modified). Order: similarity
    descending, ties by column index ascending. A partial sort finds the k best;
    a row whose k-th value is tied with an item outside them (the partial sort
    may have kept any of the tied items) is redone with a full stable sort.
    """
    rows, cols = neg_sims.shape
    if k < cols:
        part = np.argpartition(neg_sims, k - 1, axis=1)[:, :k].copy()
    else:
        part = np.broadcast_to(np.arange(cols), (rows, cols)).copy()
    vals = np.take_along_axis(neg_sims, part, axis=1)
    top = np.take_along_axis(part, np.lexsort((part, vals), axis=1), axis=1)
    if k < cols:
        kth = vals.max(axis=1)
        for row in np.nonzero((neg_sims <= kth[:, None]).sum(axis=1) > k)[0]:
            top[row] = np.argsort(neg_sims[row], kind="stable")[:k]
    return top


def retrieval(query_emb, query_labels, gallery_emb=None, gallery_labels=None, *,
              chunk_size: int = DEFAULT_CHUNK) -> dict:
    """Precision@1, R-precision and MAP@R of nearest-neighbour retrieval.

    Definitions of Musgrave, Belongie & Lim, *A Metric Learning Reality Check*
    (ECCV 2020), as pytorch-metric-learning's `AccuracyCalculator` computes
    them (`avg_of_avgs=False`). Each query ranks the gallery by cosine
    similarity. Without `gallery_emb` the gallery is the query set itself
    *minus the query* (leave-one-out); with it, the gallery is separate and
    nothing is excluded.

    For a query $q$ with label $y_q$, let $R$ be the number of gallery items
    with label $y_q$ and $\\mathrm{rel}(i) = 1$ if the $i$-th ranked item has
    label $y_q$, else 0. With $P(i) = \\frac{1}{i}\\sum_{j \\le i} \\mathrm{rel}(j)$:

    - precision@1 $= \\mathrm{rel}(1)$;
    - R-precision $= \\frac{1}{R} \\sum_{i=1}^{R} \\mathrm{rel}(i)$;
    - MAP@R $= \\frac{1}{R} \\sum_{i=1}^{R} P(i)\\,\\mathrm{rel}(i)$;

    each averaged over the queries.

    **Lone queries** ($R = 0$: a class of one image, or a query class absent
    from the separate gallery) are excluded from *all three* averages, as
    pytorch-metric-learning does (its `not_lone_query_mask`); their number is
    returned as `num_lone_queries`. If every query is lone, `ValueError`.

    **Ties** in similarity are ordered by gallery index (the earlier gallery
    row ranks first), so the result is deterministic; pytorch-metric-learning
    leaves tie order to its k-NN backend. Unlike its default, $R$ is not capped
    at 1,023 neighbours (a faiss limit).

    Returns a dict: `precision_at_1`, `r_precision`, `map_at_r` (floats),
    `num_queries`, `num_evaluated`, `num_lone_queries`, `gallery_size` (ints),
    `leave_one_out` (bool).
    """
    chunk = _chunk(chunk_size)
    q = _normalized(query_emb, "query_emb")
    q_lab = _labels(query_labels, len(q), "query_labels", "query_emb")
    if (gallery_emb is None) != (gallery_labels is None):
        raise ValueError("gallery_emb, gallery_labels: give both or neither")
    same = gallery_emb is None
    if same:
        g, g_lab = q, q_lab
    else:
        g = _normalized(gallery_emb, "gallery_emb")
        g_lab = _labels(gallery_labels, len(g), "gallery_labels", "gallery_emb")
        if g.shape[1] != q.shape[1]:
            raise ValueError(f"gallery_emb: expected {q.shape[1]} columns like query_emb, "
                             f"got shape {g.shape}")
    classes, counts = np.unique(g_lab, return_counts=True)
    pos = np.clip(np.searchsorted(classes, q_lab), 0, len(classes) - 1)
    r_all = np.where(classes[pos] == q_lab, counts[pos], 0) - (1 if same else 0)
    lone = r_all == 0
    if lone.all():
        raise ValueError("query_labels: no query has a same-class item in the gallery "
                         "(every class has one image, or no query class is in gallery_labels)")
    sums = np.zeros(3)
    for start in range(0, len(q), chunk):
        stop = min(start + chunk, len(q))
        keep = ~lone[start:stop]
        if not keep.any():
            continue
        r = r_all[start:stop][keep]
        neg = (-q[start:stop][keep]) @ g.T
        if same:
            neg[np.arange(len(r)), np.arange(start, stop)[keep]] = np.inf  # the query itself
        k = int(r.max())
        top = _top_k(neg, k)
        hit = g_lab[top] == q_lab[start:stop][keep][:, None]
        rank = np.arange(1, k + 1)
        rel = hit & (rank[None, :] <= r[:, None])
        precision = np.cumsum(rel, axis=1) / rank
        sums += [hit[:, 0].sum(), (rel.sum(axis=1) / r).sum(),
                 ((precision * rel).sum(axis=1) / r).sum()]
    n_eval = int((~lone).sum())
    return {"precision_at_1": float(sums[0] / n_eval), "r_precision": float(sums[1] / n_eval),
            "map_at_r": float(sums[2] / n_eval), "num_queries": len(q),
            "num_evaluated": n_eval, "num_lone_queries": int(lone.sum()),
            "gallery_size": len(g) - (1 if same else 0), "leave_one_out": same}


# ------------------------------------------------------------------- ROC etc.

def roc_curve(scores, is_genuine) -> tuple:
    """ROC curve of a score (higher = more likely genuine/positive).

    A pair is accepted at threshold $t$ when its score is $\\ge t$. One ROC
    point per distinct score, from the highest down, plus $(0, 0)$ at
    $t = +\\infty$: equal scores form a single point, never a staircase. At
    point $k$, $\\mathrm{TPR} = TP_k / P$ and $\\mathrm{FPR} = FP_k / N$, with
    $P$, $N$ the numbers of genuine and impostor pairs. This is
    `sklearn.metrics.roc_curve(..., drop_intermediate=False)`, with counts
    accumulated in integers.

    Returns `(fpr, tpr, thresholds)`, float64 arrays of equal length,
    thresholds decreasing from `inf`.
    """
    s = _scores(scores, "scores")
    y = _binary(is_genuine, len(s), "is_genuine")
    _both_classes(y, "is_genuine")
    order = np.argsort(s, kind="stable")[::-1]
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]    # last index of each run of equal scores
    tps = np.cumsum(y, dtype=np.int64)[last]
    fps = last + 1 - tps
    fpr = np.r_[0, fps] / fps[-1]
    tpr = np.r_[0, tps] / tps[-1]
    return fpr, tpr, np.r_[np.inf, s[last]]


def roc_auc(scores, is_genuine) -> float:
    """Area under the ROC curve by the trapezoidal rule,
    $\\sum_k (\\mathrm{FPR}_{k+1} - \\mathrm{FPR}_k)(\\mathrm{TPR}_{k+1} + \\mathrm{TPR}_k)/2$:
    the probability that a random genuine pair scores above a random impostor
    pair, ties counting one half. Equals `sklearn.metrics.roc_auc_score`."""
    fpr, tpr, _ = roc_curve(scores, is_genuine)
    return _auc(fpr, tpr)


def _auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2)


def equal_error_rate(fpr, tpr) -> float:
    """The error rate where false accepts equal false rejects,
    $\\mathrm{FPR} = \\mathrm{FNR} = 1 - \\mathrm{TPR}$.

    Read on the ROC curve with straight segments between its points (the curve
    the AUC integrates): $g = \\mathrm{FPR} + \\mathrm{TPR} - 1$ rises from $-1$
    at $(0, 0)$ to $1$ at $(1, 1)$; on the first segment where it reaches 0,
    the EER is the FPR where $g = 0$, by linear interpolation. All-equal scores
    give 0.5, perfectly separated scores 0.
    """
    fpr = np.asarray(fpr, np.float64)
    tpr = np.asarray(tpr, np.float64)
    g = fpr + tpr - 1.0
    k = int(np.argmax(g >= 0))
    if g[k] == 0 or k == 0:
        return float(fpr[k])
    t = -g[k - 1] / (g[k] - g[k - 1])
    return float(fpr[k - 1] + t * (fpr[k] - fpr[k - 1]))


def tar_at_far(fpr, tpr, thresholds, far: float, num_impostors: int) -> dict:
    """True accept rate at a false accept rate.

    $\\mathrm{TAR@FAR}(f) = \\max \\{\\mathrm{TPR}_k : \\mathrm{FPR}_k \\le f\\}$,
    the largest TPR of a ROC point (a real threshold, no interpolation) whose
    FPR does not exceed $f$.

    With fewer than $1/f$ impostor pairs the only FPR $\\le f$ is 0, so the
    number would describe FAR = 0, not $f$: then `tar` is None and `note` says
    why. Returns `{"far", "tar", "threshold", "note"}`.
    """
    far = _rate(far, "far")
    if num_impostors * far < 1.0 - 1e-9:
        return {"far": far, "tar": None, "threshold": None,
                "note": f"{num_impostors} impostor pairs < 1/FAR = {1 / far:g}: "
                        "FAR this low cannot be measured"}
    fpr = np.asarray(fpr)
    ok = np.nonzero(fpr <= far)[0]
    k = ok[np.argmax(np.asarray(tpr)[ok])]   # first (highest threshold) of the best
    return {"far": far, "tar": float(tpr[k]), "threshold": float(thresholds[k]), "note": None}


def _best_threshold(s_sorted: np.ndarray, y_sorted: np.ndarray) -> float:
    """The accuracy-maximising threshold on scores sorted in decreasing order and
    their labels: accept when score >= threshold."""
    s, y = s_sorted, y_sorted
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], len(s) - 1]
    tps = np.cumsum(y_sorted, dtype=np.int64)[last]
    fps = last + 1 - tps
    negatives = len(y) - int(y.sum())
    correct = np.r_[negatives, tps + negatives - fps]      # first: accept nothing
    k = int(np.argmax(correct))                            # ties: the highest threshold
    if k == 0:
        return math.inf
    high = s_sorted[last[k - 1]]
    if k == len(last):
        return float(high)
    low = s_sorted[last[k]]
    mid = high + (low - high) / 2                          # between two distinct scores
    return float(mid if low < mid <= high else high)


def ten_fold_accuracy(scores, is_genuine, folds: int = 10, seed: int = 0) -> dict:
    """Verification accuracy by the insightface k-fold protocol.

    The pairs are shuffled (`seed`) and split into `folds` near-equal folds.
    For each fold, the threshold that maximises accuracy
    $(TP + TN)/(P + N)$ on the other folds is applied to it (accept when score
    $\\ge$ threshold). The candidate thresholds are midway between consecutive
    distinct training scores (plus accept-all and accept-none); among equally
    accurate ones the highest is kept, as insightface's `argmax` over
    increasing distance thresholds does. insightface searches a fixed grid and
    keeps the LFW pair-file order; here the search is exact and the order
    shuffled.

    Returns `{"mean", "std", "accuracies", "thresholds"}` (std: population,
    `np.std`, as insightface reports).
    """
    s = _scores(scores, "scores")
    y = _binary(is_genuine, len(s), "is_genuine")
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2 \
            or folds > len(s):
        raise ValueError(f"folds: expected an int between 2 and the number of pairs "
                         f"({len(s)}), got {folds!r}")
    split = np.array_split(np.random.default_rng(seed).permutation(len(s)), int(folds))
    fold_of = np.empty(len(s), np.int64)
    for f, part in enumerate(split):
        fold_of[part] = f
    order = np.argsort(s)[::-1]            # sorted once: a fold's complement stays sorted
    s_sorted, y_sorted, fold_sorted = s[order], y[order], fold_of[order]
    accuracies, thresholds = [], []
    for f, test in enumerate(split):
        train = fold_sorted != f
        threshold = _best_threshold(s_sorted[train], y_sorted[train])
        accuracies.append(float(np.mean((s[test] >= threshold) == y[test])))
        thresholds.append(threshold)
    return {"mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)),
            "accuracies": accuracies, "thresholds": thresholds}


# --------------------------------------------------------------- verification

def sample_pairs(n: int, max_pairs: int | None = DEFAULT_MAX_PAIRS, seed: int = 0) -> tuple:
    """Index pairs `(i, j)`, `i < j`, of `n` items: all $n(n-1)/2$ of them in
    row-major order if that is at most `max_pairs` (or `max_pairs` is None),
    else `max_pairs` distinct pairs drawn uniformly without replacement from a
    generator seeded with `seed`, in row-major order."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n: expected an int >= 2, got {n!r}")
    if max_pairs is not None and (isinstance(max_pairs, bool)
                                  or not isinstance(max_pairs, (int, np.integer))
                                  or max_pairs < 1):
        raise ValueError(f"max_pairs: expected a positive int or None, got {max_pairs!r}")
    n = int(n)
    total = n * (n - 1) // 2
    if max_pairs is None or total <= max_pairs:
        return np.triu_indices(n, 1)
    rng = np.random.default_rng(seed)
    # draws with replacement, duplicates dropped, topped up: every subset of
    # max_pairs pairs is equally likely (the procedure is symmetric in the pairs)
    chosen = _sorted_unique(rng.integers(0, total, size=max_pairs))
    while len(chosen) < max_pairs:
        more = rng.integers(0, total, size=max_pairs - len(chosen))
        chosen = _sorted_unique(np.concatenate([chosen, more]))
    return _pair_from_index(chosen, n)


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    # np.unique of NumPy >= 2.3 hashes first: several times slower on 1e6 integers
    x = np.sort(x)
    return x[np.r_[True, x[1:] != x[:-1]]]


def _pair_from_index(k: np.ndarray, n: int) -> tuple:
    """Row-major position k in the strict upper triangle of n x n -> (i, j)."""
    def start(i):                      # position of (i, i + 1)
        return i * (2 * n - i - 1) // 2

    b = 2 * n - 1
    i = np.floor((b - np.sqrt(float(b) * b - 8.0 * k)) / 2).astype(np.int64)
    i = np.clip(i, 0, n - 2)
    i -= start(i) > k                  # float rounding: at most one step either way
    i += start(i + 1) <= k
    return i, k - start(i) + i + 1


def verification(emb, labels, *, max_pairs: int | None = DEFAULT_MAX_PAIRS, seed: int = 0,
                 fars=(1e-2, 1e-3), folds: int = 10) -> dict:
    """Verification on pairs of `emb`: is a pair two images of one class?

    The pairs are all $i < j$ pairs of the set, or `max_pairs` of them drawn
    with `seed` when there are more (see `sample_pairs`); a pair is *genuine*
    when its labels agree, else *impostor*; its score is the cosine of its two
    embeddings. From those: the ROC curve (`roc_curve`), its AUC (`roc_auc`),
    the EER (`equal_error_rate`), TAR at each FAR of `fars` (`tar_at_far`) and
    the `folds`-fold accuracy of the insightface protocol (`ten_fold_accuracy`,
    folds shuffled with `seed`).

    Memory grows with the number of pairs, about 150 bytes each at the peak
    (pair indices, scores, sorts and the returned ROC arrays; measured 0.65 GB
    for 4.5e6 pairs): the default `max_pairs` of 1e6 needs ~150 MB; all pairs
    of 10,000 images (5e7, `max_pairs=None`) would need ~7 GB.

    Needs at least 2 classes and a class with two images (one impostor and one
    genuine pair among those drawn), else `ValueError` naming `labels`.

    Returns a dict: `num_pairs`, `num_pairs_total`, `sampled`, `seed`,
    `num_genuine`, `num_impostor`, `roc_auc`, `eer`, `tar_at_far` (a list of
    `tar_at_far` dicts), `accuracy_mean`, `accuracy_std`, `accuracy_folds`
    and `roc`: `{"fpr", "tpr", "thresholds"}` as NumPy arrays.
    """
    e = _normalized(emb, "emb")
    lab = _labels(labels, len(e), "labels", "emb")
    if len(np.unique(lab)) < 2:
        raise ValueError("labels: verification needs at least 2 classes, got 1")
    if len(e) < 3:
        raise ValueError(f"emb: verification needs at least 3 rows, got {len(e)}")
    fars = [_rate(far, "fars") for far in np.atleast_1d(fars)]
    i, j = sample_pairs(len(e), max_pairs, seed)
    genuine = lab[i] == lab[j]
    n_gen = int(genuine.sum())
    if n_gen == 0 or n_gen == len(genuine):
        raise ValueError(f"labels: the {len(genuine)} pairs hold {n_gen} genuine and "
                         f"{len(genuine) - n_gen} impostor pairs; both kinds are needed "
                         "(a class with two images, and two classes)")
    scores = np.empty(len(i))
    for a in range(0, len(i), _PAIR_CHUNK):
        b = a + _PAIR_CHUNK
        scores[a:b] = np.einsum("pd,pd->p", e[i[a:b]], e[j[a:b]])
    fpr, tpr, thr = roc_curve(scores, genuine)
    n_imp = len(genuine) - n_gen
    folds_result = ten_fold_accuracy(scores, genuine, folds, seed)
    total = len(e) * (len(e) - 1) // 2
    return {"num_pairs": len(scores), "num_pairs_total": total, "sampled": len(scores) < total,
            "seed": int(seed), "num_genuine": n_gen, "num_impostor": n_imp,
            "roc_auc": _auc(fpr, tpr), "eer": equal_error_rate(fpr, tpr),
            "tar_at_far": [tar_at_far(fpr, tpr, thr, far, n_imp) for far in fars],
            "accuracy_mean": folds_result["mean"], "accuracy_std": folds_result["std"],
            "accuracy_folds": folds_result["accuracies"],
            "roc": {"fpr": fpr, "tpr": tpr, "thresholds": thr}}


# ------------------------------------------------------------------- open set

def _nearest(q: np.ndarray, refs: np.ndarray, chunk: int) -> tuple:
    """Max cosine of each (normalised) row of q over refs, and the argmax
    (the first reference among equals)."""
    best = np.empty(len(q))
    arg = np.empty(len(q), np.int64)
    for a in range(0, len(q), chunk):
        sims = q[a:a + chunk] @ refs.T
        arg[a:a + chunk] = np.argmax(sims, axis=1)
        best[a:a + chunk] = np.take_along_axis(sims, arg[a:a + chunk, None], axis=1)[:, 0]
    return best, arg


def open_set(known_emb, known_labels, unknown_emb, class_weights=None, gallery_emb=None,
             gallery_labels=None, *, far: float = 0.05, chunk_size: int = DEFAULT_CHUNK) -> dict:
    """Open-set recognition: known-class test images against images of classes
    never trained on.

    Each test image gets a score, its maximum cosine to a reference set, and a
    predicted class, that of the reference reaching it (the lowest index among
    equals). Two reference sets, each computed when given:

    - `class_weights`, a `(C, D)` matrix (a head's `weight`): row $c$ stands
      for class $c$, so `known_labels` must lie in $[0, C)$;
    - `gallery_emb` / `gallery_labels`, embeddings of known-class images
      (e.g. training images; nearest-neighbour prediction). They must not
      contain the test images themselves: nothing is excluded. A known image
      whose class has no gallery image is never predicted right.

    For each: `auroc`, the ROC AUC of telling known (positive) from unknown
    (negative) images by the score; `closed_set_accuracy`, the fraction of
    known images whose predicted class is right; `threshold`
    $= Q_{1-\\mathrm{far}}$, the $(1 - \\mathrm{far})$ quantile of the unknown
    images' scores (NumPy's default linear interpolation); `far_achieved`,
    the fraction of unknown images scoring above it (about `far`; with few
    unknown images it can exceed `far` by up to 1 / `num_unknown`); and
    `accuracy_at_far`, the fraction of known images that are predicted right
    *and* score above the threshold.

    Returns `{"far", "num_known", "num_unknown", "class_weights": {...} or
    None, "gallery": {...} or None}`.
    """
    chunk = _chunk(chunk_size)
    far = _rate(far, "far")
    known = _normalized(known_emb, "known_emb")
    k_lab = _labels(known_labels, len(known), "known_labels", "known_emb")
    unknown = _normalized(unknown_emb, "unknown_emb")
    dim = known.shape[1]
    if unknown.shape[1] != dim:
        raise ValueError(f"unknown_emb: expected {dim} columns like known_emb, got shape "
                         f"{unknown.shape}")
    if class_weights is None and gallery_emb is None:
        raise ValueError("class_weights, gallery_emb: give at least one reference set")
    if (gallery_emb is None) != (gallery_labels is None):
        raise ValueError("gallery_emb, gallery_labels: give both or neither")
    refs = {}
    if class_weights is not None:
        w = _normalized(class_weights, "class_weights")
        if w.shape[1] != dim:
            raise ValueError(f"class_weights: expected {dim} columns like known_emb, got shape "
                             f"{w.shape}")
        outside = (k_lab < 0) | (k_lab >= len(w))
        if outside.any():
            raise ValueError(f"known_labels: label {int(k_lab[np.argmax(outside)])} has no row "
                             f"in class_weights ({len(w)} classes)")
        refs["class_weights"] = (w, np.arange(len(w)))
    if gallery_emb is not None:
        g = _normalized(gallery_emb, "gallery_emb")
        if g.shape[1] != dim:
            raise ValueError(f"gallery_emb: expected {dim} columns like known_emb, got shape "
                             f"{g.shape}")
        refs["gallery"] = (g, _labels(gallery_labels, len(g), "gallery_labels", "gallery_emb"))
    out = {"far": far, "num_known": len(known), "num_unknown": len(unknown),
           "class_weights": None, "gallery": None}
    is_known = np.r_[np.ones(len(known), bool), np.zeros(len(unknown), bool)]
    for name, (ref, ref_lab) in refs.items():
        k_score, k_arg = _nearest(known, ref, chunk)
        u_score, _ = _nearest(unknown, ref, chunk)
        correct = ref_lab[k_arg] == k_lab
        threshold = float(np.quantile(u_score, 1.0 - far))
        out[name] = {"auroc": roc_auc(np.r_[k_score, u_score], is_known),
                     "closed_set_accuracy": float(correct.mean()), "threshold": threshold,
                     "far_achieved": float(np.mean(u_score > threshold)),
                     "accuracy_at_far": float(np.mean(correct & (k_score > threshold)))}
    return out


# ----------------------------------------------------------------- everything

def jsonable(value):
    """NumPy scalars and arrays -> Python numbers and lists; NaN -> None;
    recursively (for results.json)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value


def evaluate_embeddings(emb, labels, *, gallery_emb=None, gallery_labels=None,
                        unknown_emb=None, class_weights=None, far: float = 0.05,
                        max_pairs: int | None = DEFAULT_MAX_PAIRS, seed: int = 0,
                        chunk_size: int = DEFAULT_CHUNK) -> dict:
    """All the metrics of `emb` (queries / test images) and `labels`, as plain
    JSON-serialisable Python numbers (NaN becomes None).

    - `"retrieval"`: `retrieval(emb, labels, gallery_emb, gallery_labels)`
      (leave-one-out within `emb` when no gallery is given);
    - `"verification"`: `verification(emb, labels, max_pairs=..., seed=...)`
      without the ROC arrays (`num_pairs` says how many pairs were used);
    - `"open_set"`: when `unknown_emb` is given, `open_set(emb, labels,
      unknown_emb, class_weights, gallery_emb, gallery_labels, far=...)`,
      else None.

    An infinite 10-fold threshold cannot occur in the output: the fold
    thresholds are left out (see `ten_fold_accuracy` for them).
    """
    result = {"retrieval": retrieval(emb, labels, gallery_emb, gallery_labels,
                                     chunk_size=chunk_size)}
    ver = verification(emb, labels, max_pairs=max_pairs, seed=seed)
    ver.pop("roc")
    result["verification"] = ver
    result["open_set"] = None
    if unknown_emb is not None:
        result["open_set"] = open_set(emb, labels, unknown_emb, class_weights, gallery_emb,
                                      gallery_labels, far=far, chunk_size=chunk_size)
    return jsonable(result)
