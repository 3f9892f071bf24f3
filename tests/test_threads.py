"""Threads and processes: the thread count changed from another thread while
a step runs, a step in a child forked after threads ran, and backward against
a batch other than the last forward's. Crashes and hangs are caught in a
subprocess with a timeout."""
import hashlib
import subprocess
import tempfile
import sys
import textwrap

import numpy as np
import pytest

import adaloss
from adaloss import _core


def run_script(source: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # run outside the project folder: `-c` puts the current folder first on
    # sys.path, and the source folder adaloss/ there has no built extension
    return subprocess.run([sys.executable, "-c", textwrap.dedent(source)], capture_output=True,
                          text=True, timeout=timeout, cwd=tempfile.gettempdir())


def test_set_num_threads_from_another_thread_during_steps():
    """Each step used to size its conv workspace for one count while its conv
    kernels read the new one and wrote past it (exit 139)."""
    proc = run_script('''
        import threading
        import numpy as np
        import adaloss

        stop = False

        def toggle():
            while not stop:
                adaloss.set_num_threads(1)
                adaloss.set_num_threads(16)

        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (16, 3, 16, 16), dtype=np.uint8)
        y = rng.integers(0, 10, 16)
        thread = threading.Thread(target=toggle)
        thread.start()
        try:
            for _ in range(40):
                adaloss.set_num_threads(1)   # a fresh net plans for one thread
                net = adaloss.Sequential([adaloss.Conv2d(3, 16, 3, padding=1), adaloss.ReLU(),
                                          adaloss.MaxPool2d(2), adaloss.Flatten(),
                                          adaloss.Linear(1024, 8)])
                trainer = adaloss.Trainer(net, adaloss.ArcFace(10, 8),
                                          adaloss.Adam(net.parameters()))
                for _ in range(3):
                    assert np.isfinite(trainer.step(x, y))
        finally:
            stop = True
            thread.join()
        print("done")
    ''')
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.split() == ["done"]


def test_set_num_threads_is_capped_with_a_clear_error():
    before = adaloss.get_num_threads()
    for bad in (_core.MAX_THREADS + 1, 1024):
        with pytest.raises(ValueError,
                           match=rf"^num_threads: expected 1\.\.{_core.MAX_THREADS}, got {bad}$"):
            adaloss.set_num_threads(bad)
    assert adaloss.get_num_threads() == before
    adaloss.set_num_threads(_core.MAX_THREADS)
    assert adaloss.get_num_threads() == _core.MAX_THREADS
    adaloss.set_num_threads(before)


FORK_SETUP = '''
    import os, sys, time
    import numpy as np
    import adaloss

    def trainer():
        net = adaloss.Sequential([adaloss.Conv2d(1, 4, 3, padding=1), adaloss.ReLU(),
                                  adaloss.MaxPool2d(2), adaloss.Flatten(), adaloss.Linear(64, 8)])
        return adaloss.Trainer(net, adaloss.ArcFace(10, 8), adaloss.Adam(net.parameters()))

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 1, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 10, 16)
    adaloss.set_num_threads(2)
    parent = trainer()
    parent.step(x, y)                  # two threads ran: OpenMP's pool exists
'''


def test_step_in_a_forked_child_does_not_hang():
    proc = run_script(FORK_SETUP + '''
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            loss = parent.step(x, y)
            threads = adaloss.get_num_threads()
            try:
                adaloss.set_num_threads(2)
                more = "accepted"
            except RuntimeError as exc:
                more = str(exc)
            print(f"child {np.isfinite(loss)} {threads} {more}", flush=True)
            code = 0
        finally:
            os._exit(code)
    for _ in range(600):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            print("exit", os.waitstatus_to_exitcode(status))
            sys.exit(0)
        time.sleep(0.1)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    print("hung")
    ''', timeout=200)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stdout.splitlines()
    assert lines[-1] == "exit 0", proc.stdout
    child = lines[0].split(maxsplit=3)
    assert child[:3] == ["child", "True", "1"], proc.stdout
    assert child[3].startswith("num_threads: ") and "fork" in child[3], proc.stdout
    # the parent keeps its threads
    assert "hung" not in proc.stdout


def test_fork_pool_does_not_hang():
    proc = run_script(FORK_SETUP + '''
    import multiprocessing

    def work(seed):
        return float(trainer().step(x, y))

    with multiprocessing.get_context("fork").Pool(2) as pool:
        losses = pool.map_async(work, range(4)).get(timeout=120)
    print(len(losses), all(np.isfinite(losses)), adaloss.get_num_threads())
    ''', timeout=200)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.split() == ["4", "True", "2"]


def small_net():
    return adaloss.Sequential([adaloss.Conv2d(1, 2, 3, padding=1), adaloss.ReLU(),
                               adaloss.MaxPool2d(2), adaloss.Flatten(), adaloss.Linear(8, 3)],
                              input_shape=(1, 4, 4))


def test_backward_must_match_the_last_forward():
    """forward(4 rows), forward(2 rows), backward(4 rows) used to be accepted
    and return gradients computed from the first batch's activations."""
    rng = np.random.default_rng(3)
    net = small_net()
    x4 = rng.normal(size=(4, 1, 4, 4)).astype(np.float32)
    net.forward(x4)
    net.forward(x4[:2])
    net.zero_grad()
    before = [p.grad.copy() for p in net.parameters()]
    with pytest.raises(ValueError, match=r"^d_emb: expected 2 rows \(the batch of the last "
                                         r"forward\), got 4"):
        net.backward(np.ones((4, 3), np.float32))
    for p, g in zip(net.parameters(), before):
        np.testing.assert_array_equal(p.grad, g)   # nothing accumulated
    # the matching batch works and equals a fresh forward + backward
    d = rng.normal(size=(2, 3)).astype(np.float32)
    dx = net.backward(d)
    grads = [p.grad.copy() for p in net.parameters()]
    net.zero_grad()
    net.forward(x4[:2])
    np.testing.assert_array_equal(net.backward(d), dx)
    for p, g in zip(net.parameters(), grads):
        np.testing.assert_array_equal(p.grad, g)


def test_backward_after_an_empty_forward_or_none_is_rejected():
    net = small_net()
    with pytest.raises(ValueError, match="^d_emb: .*no forward yet"):
        net.backward(np.ones((1, 3), np.float32))
    net.forward(np.zeros((4, 1, 4, 4), np.float32))
    assert net.forward(np.zeros((0, 1, 4, 4), np.float32)).shape == (0, 3)
    with pytest.raises(ValueError, match=r"^d_emb: expected 0 rows"):
        net.backward(np.ones((4, 3), np.float32))


# --------------------------------------------------- thread-count independence

def trained_digest(config, threads: int, batches=(64, 37)) -> str:
    """SHA-256 of a preset network's weights, head weights and Adam state
    after one step per batch size (64, and 37: a batch that no piece of work
    divides) with `threads` C-core threads."""
    from adaloss import presets
    before = adaloss.get_num_threads()
    adaloss.set_num_threads(threads)
    try:
        trainer = presets.build(config, seed=0)
        rng = np.random.default_rng(7)
        shape = presets.INPUT_SHAPES[config.dataset]
        losses = []
        for batch in batches:
            x = rng.integers(0, 256, (batch, *shape), dtype=np.uint8)
            y = rng.integers(0, 10, batch)
            losses.append(trainer.step(x, y))
    finally:
        adaloss.set_num_threads(before)
    digest = hashlib.sha256(np.asarray(losses, np.float64).tobytes())
    for name, value in sorted(trainer.net.state_dict().items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    digest.update(np.ascontiguousarray(trainer.head.weight).tobytes())
    return digest.hexdigest()


def preset_networks():
    from adaloss import presets
    configs = [c for d in presets.DATASETS for p in ("report", "fair") for c in presets.runs(d, p)]
    quick = {"mnist-report-adaface", "cifar10-fair-arcface"}   # linear-heavy; 4 map sizes
    return [pytest.param(c, id=c.name, marks=() if c.name in quick else pytest.mark.slow)
            for c in configs]


@pytest.mark.parametrize("config", preset_networks())
def test_weights_do_not_depend_on_the_thread_count(config):
    """The same losses and bit-identical weights after training steps on 1, 2
    and 3 threads: the GEMMs are cut into the same calls, the convolutions into
    the same groups and gradient chunks, whatever the thread count."""
    digests = {threads: trained_digest(config, threads) for threads in (1, 2, 3)}
    assert len(set(digests.values())) == 1, digests



@pytest.mark.parametrize("batch", [1, 20])
def test_backward_on_more_threads_than_the_forward_planned(batch):
    """The workspace is planned at the forward for its thread count; a count
    raised before backward used to run past it (a crash at batch 1, wrong
    gradients at 20). Backward now keeps to the planned count: the gradients
    equal those of a forward and backward on one thread."""
    def grads(forward_threads, backward_threads):
        before = adaloss.get_num_threads()
        try:
            adaloss.manual_seed(4)
            net = adaloss.Sequential([adaloss.Conv2d(3, 8, 3, padding=1), adaloss.ReLU(),
                                      adaloss.Conv2d(8, 8, 3, padding=1), adaloss.ReLU()],
                                     input_shape=(3, 8, 8))
            x = np.random.default_rng(5).normal(size=(batch, 3, 8, 8)).astype(np.float32)
            adaloss.set_num_threads(forward_threads)
            out = net.forward(x)
            adaloss.set_num_threads(backward_threads)
            dx = net.backward(np.random.default_rng(6).normal(size=out.shape).astype(np.float32))
        finally:
            adaloss.set_num_threads(before)
        return [dx] + [p.grad.copy() for p in net.parameters()]

    for got, want in zip(grads(1, 4), grads(1, 1)):
        np.testing.assert_array_equal(got, want)
