"""Threads: the C calls release the GIL, two models run side by side and give exactly the
sequential results, and one model used from two threads at once refuses the second call
with a clear RuntimeError (the trainer's busy flag) instead of corrupting its buffers."""
import threading
import time

import numpy as np
import pytest

from _util import phantom_like, small_cfg
from afire import AFiRe, _C


def run_steps(model, batches, out, key):
    try:
        out[key] = [model.train_step(b)["loss"] for b in batches]
    except BaseException as e:  # noqa: BLE001 - re-raised by the test
        out[key] = e


def state_bytes(m):
    return {k: v.tobytes() for k, v in m.state_tensors().items()}


def test_two_models_in_two_threads_match_sequential_runs():
    cfgs = [small_cfg(seed=1), small_cfg(seed=2)]
    data = [[phantom_like(4, seed=10 * j + i) for i in range(4)] for j in range(2)]
    seq = []
    for cfg, batches in zip(cfgs, data):
        m = AFiRe(cfg, steps_per_epoch=2)
        out = {}
        run_steps(m, batches, out, 0)
        seq.append((out[0], state_bytes(m), m.encode(batches[0])))
    for _ in range(3):  # several interleavings
        models = [AFiRe(c, steps_per_epoch=2) for c in cfgs]
        out = {}
        threads = [threading.Thread(target=run_steps, args=(m, b, out, j))
                   for j, (m, b) in enumerate(zip(models, data))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for j, m in enumerate(models):
            assert not isinstance(out[j], BaseException), out[j]
            assert out[j] == seq[j][0]
            assert state_bytes(m) == seq[j][1]
            np.testing.assert_array_equal(m.encode(data[j][0]), seq[j][2])


def test_train_step_releases_the_gil():
    # A pure-Python loop keeps running while another thread is inside one C train_step; if
    # the step held the GIL, no timestamps would fall inside it.
    m = AFiRe(small_cfg(img_size=64, batch_size=16), steps_per_epoch=2)
    x = phantom_like(16, s=64)
    m.train_step(x)  # warm up
    window = {}

    def step():
        window["t0"] = time.perf_counter()
        m.train_step(x)
        window["t1"] = time.perf_counter()

    stamps = []
    t = threading.Thread(target=step)
    t.start()
    while t.is_alive():
        stamps.append(time.perf_counter())
    t.join()
    t0, t1 = window["t0"], window["t1"]
    inside = [s for s in stamps if t0 + 0.1 * (t1 - t0) < s < t1 - 0.1 * (t1 - t0)]
    assert t1 - t0 > 0.01
    assert len(inside) > 100, f"{len(inside)} Python iterations ran during a {t1 - t0:.3f}s step"


def _collide(call_a, call_b, seconds=20.0):
    """call_a in a loop in a thread, call_b in a loop here, until one of them is refused.
    Returns the RuntimeError seen (or None). Any other exception fails the test."""
    stop = threading.Event()
    seen, errors = [], []

    def loop(call):
        deadline = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                call()
            except RuntimeError as e:
                seen.append(e)
                stop.set()
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                stop.set()

    t = threading.Thread(target=loop, args=(call_a,))
    t.start()
    try:
        loop(call_b)
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    return seen[0] if seen else None


def test_one_model_from_two_threads_raises_a_clear_error():
    m = AFiRe(small_cfg(img_size=64, batch_size=16), steps_per_epoch=2)
    x = phantom_like(16, s=64)
    err = _collide(lambda: m.train_step(x), lambda: m.encode(x[:2]))
    assert err is not None, "the two threads never overlapped"
    assert "another thread" in str(err)
    err = _collide(lambda: m.train_step(x), lambda: m.train_step(x))
    assert err is not None and "another thread" in str(err)
    # the refused calls changed nothing: the model still trains and stays finite
    before = m.step
    m.train_step(x)
    assert m.step == before + 1
    assert all(np.isfinite(v).all() for v in m.state_tensors().values())


def test_step_cannot_be_set_while_a_step_runs():
    m = AFiRe(small_cfg(img_size=64, batch_size=16), steps_per_epoch=2)
    x = phantom_like(16, s=64)

    def set_step():
        m._t.step = m._t.step  # noqa: PLW0127 - the setter claims the trainer

    err = _collide(lambda: m.train_step(x), set_step)
    assert err is not None and "another thread" in str(err)


def test_networks_busy_flag():
    n = _C.model.Networks("test", image_size=64, embed_dim=64, depth=2)
    c = n.config
    img = np.random.default_rng(0).normal(size=(32, 1, 64, 64)).astype(np.float32)
    n.encoder_forward(img)
    err = _collide(lambda: n.encoder_forward(img), lambda: n.zero_grad())
    assert err is not None and "in use by another thread" in str(err)
    assert n.encoder_forward(img[:1]).shape == (1, c["num_tokens"], c["embed_dim"])


@pytest.mark.parametrize("n_threads", [4])
def test_many_threads_each_with_its_own_model(n_threads):
    imgs = phantom_like(4, seed=3)
    ref = AFiRe(small_cfg(), steps_per_epoch=2).encode(imgs)
    models = [AFiRe(small_cfg(), steps_per_epoch=2) for _ in range(n_threads)]
    res = [None] * n_threads

    def work(i):
        res[i] = [models[i].encode(imgs) for _ in range(10)]

    ts = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    for r in res:
        for e in r:
            np.testing.assert_array_equal(e, ref)
