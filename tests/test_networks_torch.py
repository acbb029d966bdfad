"""The three networks against a PyTorch float64 reference (fixture written by
tests/fixtures/make_torch_reference.py; this test needs numpy only).

Loss = sum(head(E(x)) R1) + sum(decoder(E(x), mask) R2) + sum(E(x) R3), test preset,
weights from afire's own init (seed in the fixture). Tolerances (our fp32 vs torch fp64):
outputs 1e-5 absolute; each parameter tensor's gradient within 5e-5 of that tensor's
largest reference magnitude (plus 1e-7) — the head gradients reach ~1e3 at init because
||z|| ~ 1e-3 before the L2 normalisation, so a per-tensor scale is the meaningful one.
(Observed when written: outputs <= 7e-7, gradients <= 7e-7 of the per-tensor scale.)
"""
import os

import numpy as np
import pytest

import afire  # noqa: F401
from afire._C import model

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "networks_torch_reference.npz")


@pytest.fixture(scope="module")
def run():
    ref = np.load(FIXTURE)
    n = model.Networks("test", seed=int(ref["seed"]))
    for net in ("encoder", "head", "decoder"):
        s = np.abs(n.params(net).astype(np.float64)).sum()
        assert abs(s - float(ref[f"param_sum_{net}"])) < 1e-6 * s, \
            f"{net} init changed: regenerate the fixture with make_torch_reference.py"
    n.zero_grad()
    tok = n.encoder_forward(ref["images"])
    logits = n.head_forward(tok)
    pred = n.decoder_forward(tok, ref["token_mask"])
    d = n.head_backward(ref["R1"]) + n.decoder_backward(ref["R2"])
    n.encoder_backward(d + ref["R3"])
    return n, ref, dict(tokens=tok, logits=logits, pred=pred)


@pytest.mark.parametrize("what", ["tokens", "logits", "pred"])
def test_forward_matches_torch(run, what):
    _, ref, out = run
    np.testing.assert_allclose(out[what], ref[what], rtol=0, atol=1e-5)


@pytest.mark.parametrize("net", ["encoder", "head", "decoder"])
def test_all_gradients_match_torch(run, net):
    n, ref, _ = run
    g, gr = n.grads(net), ref[f"grad_{net}"]
    checked = 0
    for name, off, shape, _, trainable in n.named_parameters(net):
        sl = slice(off, off + int(np.prod(shape)))
        if not trainable:
            assert not g[sl].any(), name
            continue
        scale = np.abs(gr[sl]).max()
        err = np.abs(g[sl] - gr[sl]).max()
        assert err <= 5e-5 * scale + 1e-7, (name, err, scale)
        checked += 1
    assert checked == sum(t[4] for t in n.named_parameters(net))
