"""Wrapper hygiene: bad input raises a clear exception naming the argument,
inputs are never modified, unusual but valid input is converted, memory does
not grow, and the GIL is released."""
import gc
import threading
import time

import numpy as np
import pytest

import adaloss


def small_net():
    return adaloss.Sequential([adaloss.Conv2d(1, 4, 3, padding=1), adaloss.ReLU(),
                               adaloss.MaxPool2d(2), adaloss.Flatten(), adaloss.Linear(64, 8)])


def rss_kb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


BAD_X = [
    ("float64 ok", np.zeros((2, 1, 8, 8)), None),
    ("float16 ok", np.zeros((2, 1, 8, 8), np.float16), None),
    ("noncontig ok", np.zeros((2, 1, 8, 16), np.float32)[..., ::2], None),
    ("negative stride ok", np.zeros((2, 1, 8, 8), np.float32)[::-1], None),
    ("int64", np.zeros((2, 1, 8, 8), np.int64), TypeError),
    ("bool", np.zeros((2, 1, 8, 8), bool), TypeError),
    ("object", np.empty((2, 1, 8, 8), object), TypeError),
    ("complex", np.zeros((2, 1, 8, 8), np.complex64), TypeError),
    ("string", "abc", TypeError),
    ("none", None, TypeError),
    ("rank 3", np.zeros((2, 8, 8), np.float32), ValueError),
    ("rank 5", np.zeros((2, 1, 1, 8, 8), np.float32), ValueError),
    ("wrong channels", np.zeros((2, 3, 8, 8), np.float32), ValueError),
    ("wrong size", np.zeros((2, 1, 9, 8), np.float32), ValueError),
    ("nan", np.full((2, 1, 8, 8), np.nan, np.float32), ValueError),
    ("inf", np.full((2, 1, 8, 8), np.inf, np.float32), ValueError),
    ("scalar", np.float32(1.0), ValueError),
]


@pytest.mark.parametrize("case,x,error", BAD_X, ids=[c[0] for c in BAD_X])
def test_net_forward_inputs(case, x, error):
    net = small_net()
    if error is None:
        out = net.forward(x)
        assert out.shape == (2, 8) and out.dtype == np.float32
    else:
        with pytest.raises(error, match="x"):
            net.forward(x)


@pytest.mark.parametrize("case,x,error", BAD_X, ids=[c[0] for c in BAD_X])
def test_train_step_inputs(case, x, error):
    net = small_net()
    head = adaloss.CosFace(10, 8)
    trainer = adaloss.Trainer(net, head, adaloss.Adam(net.parameters() + head.parameters()))
    before = net.state_dict()
    if error is None:
        assert np.isfinite(trainer.step(x, np.array([1, 2])))
    else:
        with pytest.raises(error, match="x"):
            trainer.step(x, np.array([1, 2]))
        for k, v in net.state_dict().items():
            np.testing.assert_array_equal(v, before[k])   # nothing changed


BAD_LABELS = [
    ("out of range", np.array([1, 10]), ValueError, "labels"),
    ("negative", np.array([-1, 0]), ValueError, "labels"),
    ("float", np.array([1.0, 2.0]), TypeError, "labels"),
    ("bool", np.array([True, False]), TypeError, "labels"),
    ("wrong length", np.array([1, 2, 3]), ValueError, "labels"),
    ("2-D", np.array([[1, 2]]), ValueError, "labels"),
    ("string", "ab", TypeError, "labels"),
    ("huge", np.array([2 ** 40, 0]), ValueError, "labels"),
]


@pytest.mark.parametrize("case,labels,error,name", BAD_LABELS, ids=[c[0] for c in BAD_LABELS])
def test_labels(case, labels, error, name):
    net = small_net()
    head = adaloss.AdaFace(10, 8)
    trainer = adaloss.Trainer(net, head, adaloss.Adam(net.parameters()))
    x = np.zeros((2, 1, 8, 8), np.uint8)
    mean = head.running_mean
    with pytest.raises(error, match=name):
        trainer.step(x, labels)
    with pytest.raises(error, match=name):
        head.forward(np.ones((2, 8), np.float32), labels)
    assert head.running_mean == mean


def test_other_label_dtypes_work():
    head = adaloss.Softmax(10, 8)
    emb = np.ones((3, 8), np.float32)
    for dt in (np.int8, np.uint8, np.int32, np.uint64):
        assert np.isfinite(head.forward(emb, np.array([0, 5, 9], dt)))


def test_constructor_arguments():
    cases = [
        (lambda: adaloss.Conv2d(0, 4), ValueError, "in_channels"),
        (lambda: adaloss.Conv2d(1, 4, 2), ValueError, "kernel_size"),
        (lambda: adaloss.Conv2d(1, 4, 3, padding=-1), ValueError, "padding"),
        (lambda: adaloss.Conv2d(1.5, 4), TypeError, "in_channels"),
        (lambda: adaloss.Linear(10, 0), ValueError, "out_features"),
        (lambda: adaloss.Linear(2 ** 40, 2), ValueError, "in_features"),
        (lambda: adaloss.MaxPool2d(3), ValueError, "kernel_size"),
        (lambda: adaloss.ArcFace(0, 8), ValueError, "num_classes"),
        (lambda: adaloss.ArcFace(10, 0), ValueError, "embedding_dim"),
        (lambda: adaloss.ArcFace(10, 2 ** 30), ValueError, "embedding_dim"),
        (lambda: adaloss.ArcFace(10, 8, variant="best"), ValueError, "variant"),
        (lambda: adaloss.ArcFace(10, 8, s=0), ValueError, "s"),
        (lambda: adaloss.ArcFace(10, 8, s=float("nan")), ValueError, "s"),
        (lambda: adaloss.AdaFace(10, 8, m="0.4"), TypeError, "m"),
        (lambda: adaloss.Adam([1, 2]), TypeError, "params"),
        (lambda: adaloss.Adam([], lr=-1), ValueError, "lr"),
        (lambda: adaloss.Adam([], betas=(0.9, 1.0)), ValueError, "betas"),
        (lambda: adaloss.Sequential([]), ValueError, "layers"),
        (lambda: adaloss.Sequential([adaloss.ReLU(), "relu"], input_shape=(1, 2, 2)), TypeError,
         "layers"),
        (lambda: adaloss.Sequential([adaloss.Conv2d(1, 2)], input_shape=(3, 8, 8)), ValueError,
         "input channels"),
        (lambda: adaloss.Sequential([adaloss.Conv2d(1, 2), adaloss.Linear(72, 2)],
                                    input_shape=(1, 8, 8)), ValueError, "Flatten"),
        (lambda: adaloss.Sequential([adaloss.Flatten(), adaloss.Linear(63, 2)],
                                    input_shape=(1, 8, 8)), ValueError, "in_features"),
        (lambda: adaloss.Trainer(small_net(), adaloss.ArcFace(10, 9), adaloss.Adam([])),
         ValueError, "embedding_dim"),
        (lambda: adaloss.set_num_threads(0), ValueError, "num_threads"),
    ]
    for make, error, word in cases:
        with pytest.raises(error, match=word):
            make()


def test_layer_owned_by_one_network():
    conv = adaloss.Conv2d(1, 2, 3, padding=1)
    adaloss.Sequential([conv], input_shape=(1, 4, 4))
    with pytest.raises(ValueError, match="another Sequential"):
        adaloss.Sequential([conv], input_shape=(1, 4, 4))


def test_head_methods_reject_bad_input():
    head = adaloss.ArcFace(10, 8, variant="report")
    with pytest.raises(ValueError, match="emb"):
        head.forward(np.ones((2, 7), np.float32), np.array([0, 1]))
    with pytest.raises(ValueError, match="emb"):
        head.forward(np.zeros((0, 8), np.float32), np.zeros(0, np.int64))
    with pytest.raises(RuntimeError, match="forward"):
        adaloss.CosFace(10, 8).backward()
    with pytest.raises(ValueError, match="labels"):
        head.logits(np.ones((2, 8), np.float32), rule="report")
    with pytest.raises(ValueError, match="rule"):
        head.logits(np.ones((2, 8), np.float32), rule="other")
    with pytest.raises(ValueError, match="variant='report'"):
        adaloss.ArcFace(10, 8).logits(np.ones((2, 8), np.float32), np.array([0, 1]), rule="report")
    with pytest.raises(ValueError, match="weight"):
        head.weight = np.ones((3, 3))
    with pytest.raises(ValueError, match="state"):
        small_net().load_state_dict({"0.weight": np.zeros((4, 1, 3, 3))})
    with pytest.raises(ValueError, match="shape"):
        net = small_net()
        sd = net.state_dict()
        sd["0.bias"] = np.zeros(5)
        net.load_state_dict(sd)


def test_net_backward_checks_shape():
    net = small_net()
    with pytest.raises(ValueError, match="d_emb"):
        net.backward(np.ones((2, 8), np.float32))        # no forward yet
    net.forward(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="d_emb"):
        net.backward(np.ones((2, 7), np.float32))
    with pytest.raises(ValueError, match="d_emb"):
        net.backward(np.full((2, 8), np.nan, np.float32))


def test_inputs_are_not_modified(rng):
    net = small_net()
    head = adaloss.AdaFace(10, 8)
    trainer = adaloss.Trainer(net, head, adaloss.Adam(net.parameters() + head.parameters()))
    x = rng.normal(size=(4, 1, 8, 8)).astype(np.float32)
    y = np.array([1, 2, 3, 4])
    x0, y0 = x.copy(), y.copy()
    trainer.step(x, y)
    emb = net.forward(x)
    emb0 = emb.copy()
    head.forward(emb, y)
    head.backward()
    head.logits(emb)
    d = rng.normal(size=emb.shape).astype(np.float32)
    d0 = d.copy()
    net.backward(d)
    for a, b in ((x, x0), (y, y0), (emb, emb0), (d, d0)):
        np.testing.assert_array_equal(a, b)


def test_parameters_are_views_of_c_memory():
    net = small_net()
    p = net.parameters()[0]
    p.data[...] = 0.0
    assert np.all(net.state_dict()["0.weight"] == 0)
    out = net.forward(np.ones((1, 1, 8, 8), np.float32))
    assert out.shape == (1, 8)
    assert not p.data.flags.owndata


def test_batch_of_one_and_empty():
    net = small_net()
    head = adaloss.AdaFace(10, 8)
    trainer = adaloss.Trainer(net, head, adaloss.Adam(net.parameters() + head.parameters()))
    assert np.isfinite(trainer.step(np.zeros((1, 1, 8, 8), np.uint8), np.array([3])))
    assert net.forward(np.zeros((0, 1, 8, 8), np.float32)).shape == (0, 8)
    with pytest.raises(ValueError, match="x"):
        trainer.step(np.zeros((0, 1, 8, 8), np.uint8), np.zeros(0, np.int64))


def test_heads_finite_at_the_edges():
    """cos = +-1, theta + m > pi, zero-norm embeddings, s up to 128."""
    w = np.eye(4, 8, dtype=np.float32)
    for head in (adaloss.ArcFace(4, 8, s=128.0), adaloss.AdaFace(4, 8, s=128.0),
                 adaloss.ArcFace(4, 8, s=128.0, variant="report"),
                 adaloss.AdaFace(4, 8, s=128.0, variant="report"), adaloss.CosFace(4, 8, s=128.0)):
        head.weight = w
        for emb in (np.eye(4, 8, dtype=np.float32),           # cos = 1 on the target
                    -np.eye(4, 8, dtype=np.float32),          # cos = -1: theta + m > pi
                    np.zeros((4, 8), np.float32)):            # zero norm
            loss = head.forward(emb, np.arange(4))
            d = head.backward()
            assert np.isfinite(loss) and np.all(np.isfinite(d)) and np.all(np.isfinite(head.weight_grad))


@pytest.mark.slow
def test_memory_does_not_grow():
    """Training, inference and making networks do not leak. Measured after one
    warm-up round of each: the allocator's caches settle at a few MiB once
    (seen: +6.8 MiB over the first 200 networks, then flat within 1.5 MiB over
    2,400 more), a leak keeps growing."""
    net = small_net()
    head = adaloss.ArcFace(10, 8)
    trainer = adaloss.Trainer(net, head, adaloss.Adam(net.parameters() + head.parameters()))
    x = np.zeros((16, 1, 8, 8), np.uint8)
    y = np.arange(16) % 10

    def make_networks(count):
        for _ in range(count):
            n = small_net()
            h = adaloss.AdaFace(10, 8)
            adaloss.Trainer(n, h, adaloss.Adam(n.parameters() + h.parameters())).step(x, y)
            try:
                n.forward(np.zeros((2, 2, 2, 2), np.float32))
            except ValueError:
                pass

    for _ in range(200):
        trainer.step(x, y)
    make_networks(300)
    gc.collect()
    start = rss_kb()
    for _ in range(10000):
        trainer.step(x, y)
        net.forward(x)
        head.logits(net.forward(x))
    make_networks(1000)
    gc.collect()
    assert rss_kb() - start < 6 * 1024, (start, rss_kb())


@pytest.mark.slow
def test_gil_released_and_threads_agree(threads):
    """Two networks trained in two Python threads at once give the same weights
    as one after the other, the threads overlap, and a Python thread keeps
    running while a long C call works (the call releases the GIL)."""
    threads(1)
    from reference import REPORT_NETS, adaloss_net

    def make(seed):
        adaloss.manual_seed(seed)
        net = adaloss_net(adaloss, REPORT_NETS["mnist-arcface"][2])
        head = adaloss.ArcFace(10, 128)
        return adaloss.Trainer(net, head, adaloss.Adam(net.parameters() + head.parameters()))

    data = np.random.default_rng(0)
    batches = [(data.integers(0, 256, (64, 1, 28, 28), dtype=np.uint8), data.integers(0, 10, 64))
               for _ in range(15)]

    def train(trainer, spans):
        t0 = time.perf_counter()
        for x, y in batches:
            trainer.step(x, y)
        spans.append((t0, time.perf_counter()))

    serial = [make(1), make(2)]
    for tr in serial:
        train(tr, [])
    parallel = [make(1), make(2)]
    spans = []
    workers = [threading.Thread(target=train, args=(tr, spans)) for tr in parallel]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for a, b in zip(serial, parallel):
        for k, v in a.net.state_dict().items():
            np.testing.assert_array_equal(v, b.net.state_dict()[k])
    (s1, e1), (s2, e2) = spans
    assert min(e1, e2) > max(s1, s2)          # the two threads ran at the same time

    # One forward of a large batch takes most of a second. Were the GIL held,
    # a Python thread ticking meanwhile would see one gap as long as the call;
    # released, its gaps stay near the interpreter's 5 ms switch interval.
    net = serial[0].net
    big = np.random.default_rng(1).standard_normal((4096, 1, 28, 28)).astype(np.float32)
    ticks, call = [], []
    done = threading.Event()

    def forward():
        call.append(time.perf_counter())
        net.forward(big)
        call.append(time.perf_counter())
        done.set()

    worker = threading.Thread(target=forward)
    worker.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
    worker.join()
    inside = [t for t in ticks if call[0] <= t <= call[1]]
    duration = call[1] - call[0]
    assert len(inside) > 10, (len(inside), duration)
    gaps = np.diff([call[0], *inside, call[1]])
    assert gaps.max() < 0.5 * duration, (gaps.max(), duration)


def test_one_object_in_two_threads_is_refused():
    net = small_net()
    head = adaloss.ArcFace(10, 8)
    trainer = adaloss.Trainer(net, head, adaloss.Adam(net.parameters()))
    x = np.zeros((4096, 1, 8, 8), np.uint8)
    y = np.zeros(4096, np.int64)
    errors = []

    def run():
        for _ in range(30):
            try:
                trainer.step(x, y)
            except RuntimeError as exc:
                errors.append(str(exc))

    workers = [threading.Thread(target=run) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert all("in use by another thread" in e for e in errors)


def test_trainer_refuses_an_optimizer_of_other_parameters_and_keeps_its_parts():
    net, head = small_net(), adaloss.ArcFace(10, 8)
    other = small_net()
    for params, needle in ((other.parameters(), "4 parameter\\(s\\) of another network"),
                           (net.parameters()[:2], "2 of the network's 4 parameter\\(s\\) missing"),
                           (head.parameters(), "missing"), ([], "missing")):
        with pytest.raises(ValueError, match=f"optimizer: .*{needle}"):
            adaloss.Trainer(net, head, adaloss.Adam(params))
    frozen = adaloss.Trainer(net, head, adaloss.Adam(net.parameters()))
    trained = adaloss.Trainer(net, head, adaloss.Adam(net.parameters() + head.parameters()))
    assert not frozen.head_trained and trained.head_trained
    for name, value in (("net", other), ("head", adaloss.ArcFace(10, 8)),
                        ("optimizer", adaloss.Adam(other.parameters()))):
        with pytest.raises(AttributeError, match=f"Trainer.{name} is read-only"):
            setattr(trained, name, value)
    assert trained.net is net and trained.head is head
    # so a step always trains the trainer's own network
    x = np.random.default_rng(0).integers(0, 256, (16, 1, 8, 8), dtype=np.uint8)
    before = net.state_dict()
    trained.step(x, np.arange(16) % 10)
    assert any(not np.array_equal(v, net.state_dict()[k]) for k, v in before.items())
