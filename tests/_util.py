"""Helpers shared by the model tests (imported as a plain module: tests/ is on sys.path)."""
import numpy as np

from afire import AFiRe, Config


def phantom_like(n, s=32, seed=0):
    """Cheap chest-like test images: bright body, two darker lungs, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:s, 0:s] / s
    imgs = []
    for _ in range(n):
        body = 170 + 40 * np.exp(-((xx - 0.5) ** 2) / 0.2)
        for cx in (0.3, 0.7):
            body -= 90 * np.exp(-(((xx - cx) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2))
        img = body + rng.normal(0, 6, (s, s))
        imgs.append(np.clip(img, 0, 255))
    return np.stack(imgs).astype(np.uint8)


def small_cfg(**kw):
    base = dict(epochs=2, warmup_epochs=1, batch_size=4)
    base.update(kw)
    return Config.preset_config("test", **base)


def assert_runs_bit_identical(device, precision):
    """Two 5-step runs from the same seed: equal losses, state tensors and encodings."""
    def run():
        m = AFiRe(small_cfg(seed=5, precision=precision), device=device, steps_per_epoch=2)
        return [m.train_step(phantom_like(4, seed=i)) for i in range(5)], m
    a, ma = run()
    b, mb = run()
    assert a == b
    ta, tb = ma.state_tensors(), mb.state_tensors()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)
    np.testing.assert_array_equal(ma.encode(phantom_like(2)), mb.encode(phantom_like(2)))


def op_in_fresh_process(tmp_path, op, arrays, env, info_key):
    """afire._C.ops.<op>(*arrays) in a fresh interpreter with `env` added to the environment
    (the CPU backends are chosen once per process): (its result, build_info()[info_key])."""
    import os
    import subprocess
    import sys

    for i, a in enumerate(arrays):
        np.save(tmp_path / f"in{i}.npy", a)
    code = ("import sys, numpy as np; from afire import _C; d = sys.argv[1]; "
            f"args = [np.load(f'{{d}}/in{{i}}.npy') for i in range({len(arrays)})]; "
            f"np.save(d + '/out.npy', _C.ops.{op}(*args)); "
            f"print(_C.build_info()[{info_key!r}])")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=dict(os.environ, **env),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return np.load(tmp_path / "out.npy"), p.stdout.strip()
