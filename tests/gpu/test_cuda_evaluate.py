"""The evaluation protocols with a model on the GPU: the encoder features, the random-init
baseline and the anomaly adaptation stay on the model's device and agree with the CPU."""
import numpy as np
import pytest

from _util import phantom_like, small_cfg
from afire import AFiRe
from afire.evaluate import anomaly, linear_probe
from afire.evaluate.anomaly import adapt
from afire.evaluate.common import gap_features, random_init

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu")]


def _pair():
    cfg = small_cfg(precision="fp32")
    cpu = AFiRe(cfg, steps_per_epoch=4)
    gpu = AFiRe(cfg, device="cuda", steps_per_epoch=4)
    x = phantom_like(4, seed=3)
    for _ in range(3):
        cpu.train_step(x)
        gpu.train_step(x)
    return cpu, gpu


def test_random_init_and_adaptation_stay_on_the_gpu():
    cpu, gpu = _pair()
    assert random_init(gpu, seed=1).device == "cuda"
    x = phantom_like(8, seed=5)
    new, log = adapt(gpu, x, steps=0)
    assert new.device == "cuda" and log == []
    # the copied weights reached the device (state_tensors on a GPU returns host copies)
    a, b = new.state_tensors(), gpu.state_tensors()
    for k in a:
        if not k.startswith("adam_"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_allclose(new.anomaly_log_score(x), gpu.anomaly_log_score(x), rtol=1e-6)


def test_protocols_on_the_gpu_match_the_cpu():
    cpu, gpu = _pair()
    x = phantom_like(24, seed=7)
    np.testing.assert_allclose(gap_features(gpu, x), gap_features(cpu, x), atol=2e-4)
    data = {"images": x, "abnormal": np.arange(24) % 2, "groups": np.arange(24)}
    pc = linear_probe(cpu, data, folds=1, epochs=20)
    pg = linear_probe(gpu, data, folds=1, epochs=20)
    assert abs(pc["metrics"]["mean_auc"] - pg["metrics"]["mean_auc"]) < 0.1
    ac = anomaly(cpu, data, adapt_steps=3, batch=4)
    ag = anomaly(gpu, data, adapt_steps=3, batch=4)
    assert ag["model"].device == "cuda"
    np.testing.assert_allclose(ag["arrays"]["test_log_score"], ac["arrays"]["test_log_score"],
                               rtol=1e-3, atol=1e-3)
