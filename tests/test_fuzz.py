"""Property-based fuzzing of the extension with random shapes and dtypes, in a
subprocess: whatever Python passes, the process must never die by a signal."""
import subprocess
import sys
import textwrap

FUZZ = textwrap.dedent(r'''
    import numpy as np
    from hypothesis import given, settings, strategies as st, HealthCheck
    import adaloss
    from adaloss import _core

    DTYPES = [np.float32, np.float64, np.float16, np.uint8, np.int64, np.int32, np.bool_,
              np.complex64, object]
    arrays = st.builds(
        lambda shape, dtype, fill, order: (np.full(shape, fill).astype(dtype) if dtype is not object
                                           else np.empty(shape, object)).copy(order=order),
        st.lists(st.integers(0, 9), min_size=0, max_size=5).map(tuple),
        st.sampled_from(DTYPES),
        st.sampled_from([0, 1, -3, 255, 1e30, float("nan"), float("inf")]),
        st.sampled_from(["C", "F"]))
    anything = st.one_of(arrays, st.none(), st.integers(-5, 5), st.text(max_size=3),
                         st.lists(st.integers(0, 3), max_size=4))

    net = adaloss.Sequential([adaloss.Conv2d(1, 2, 3, padding=1), adaloss.ReLU(),
                              adaloss.MaxPool2d(2), adaloss.Flatten(), adaloss.Linear(8, 4)],
                             input_shape=(1, 4, 4))
    heads = [adaloss.ArcFace(3, 4), adaloss.AdaFace(3, 4, variant="report"), adaloss.Softmax(3, 4),
             adaloss.ArcFace(3, 4, variant="report"), adaloss.CosFace(3, 4), adaloss.AdaFace(3, 4)]
    opt = adaloss.Adam(net.parameters())
    calls = 0

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(x=anything, labels=anything, which=st.integers(0, 5), rule=st.integers(-1, 2),
           flat=st.booleans(), spec=st.lists(st.integers(-2, 20), min_size=5, max_size=5))
    def fuzz(x, labels, which, rule, flat, spec):
        global calls
        head = heads[which]
        attempts = [
            lambda: _core.net_forward(net._handle, x, flat),
            lambda: _core.net_backward(net._handle, x, flat),
            lambda: _core.train_step(net._handle, head._handle, opt._handle, x, labels, flat, True),
            lambda: _core.head_forward(head._handle, x, labels, True),
            lambda: _core.head_backward(head._handle, True),
            lambda: _core.head_logits(head._handle, x, labels if rule else None, rule),
            lambda: _core.net_create([tuple(spec)], (1, 4, 4)),
            lambda: _core.head_create(spec[0], spec[1], spec[2], spec[3], 1.0, 0.5, 0.3, 0.01),
            lambda: _core.adam_create([(x, x)], 1e-3, 0.9, 0.999, 1e-8, 0.0),
            lambda: _core.gemm(x, x, bool(spec[0] % 2), bool(spec[1] % 2), 0),
            lambda: _core.net_forward(x, x, flat),
        ]
        for attempt in attempts:
            try:
                attempt()
            except (TypeError, ValueError, RuntimeError, OverflowError, MemoryError,
                    FloatingPointError):
                pass
            calls += 1

    fuzz()
    print("calls", calls)
''')


def test_extension_never_dies_by_a_signal(tmp_path):
    proc = subprocess.run([sys.executable, "-c", FUZZ], capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    calls = int(proc.stdout.split()[-1])
    assert calls >= 400 * 11
