"""The op table (csrc/python/py_op_table.c): every op-level binding of both extensions comes
from one row, checked by one checker. The CPU and GPU twins must therefore refuse the same
bad input with the same exception and message -- checked here before any device is touched,
so it runs on every CUDA build, with or without a GPU."""
import importlib.util
import os

import numpy as np
import pytest

from afire import _C, cuda

f32 = np.float32
rng = np.random.default_rng(0)


def rand(*shape):
    return rng.standard_normal(shape).astype(f32)


P = np.zeros(4, f32)
S = rng.uniform(-1, 1, (3, 4, 5)).astype(f32)
C = np.full((4, 5), 0.2, f32)
ABN = np.array([[0, 1, 0, 0], [1, 0, 0, 1], [0, 0, 1, 0]], np.uint8)
Y = rand(3, 4, 6)
IMG = np.zeros((2, 32, 32), np.uint8)

BAD = [  # (module, function, args, kwargs): each is refused by the checker
    ("ops", "linear_forward", (np.zeros((3, 4)), rand(2, 4)), {}),
    ("ops", "linear_forward", (rand(3, 4), rand(2, 5)), {}),
    ("ops", "linear_backward", (rand(3, 3), rand(3, 4), rand(2, 4)), {}),
    ("ops", "layernorm_forward", (rand(3, 4), rand(4), rand(4)), {"eps": -1.0}),
    ("ops", "layernorm_backward", (rand(3, 5), rand(3, 4), rand(4), rand(3), rand(3)), {}),
    ("ops", "gelu_backward", (rand(2, 3), rand(3, 2)), {}),
    ("ops", "softmax_forward", (np.zeros((0, 3), f32),), {}),
    ("ops", "attention_forward", (rand(1, 2, 16), 2), {}),
    ("ops", "attention_forward", (rand(1, 2, 12), 5), {}),
    ("ops", "attention_backward", (rand(1, 2, 4), rand(1, 2, 12), rand(1, 2, 2, 3), 2), {}),
    ("ops", "residual_forward", (rand(2, 3), rand(3, 2)), {}),
    ("ops", "patchify_forward", (rand(1, 1, 6, 6), 4), {}),
    ("ops", "patchify_forward", (rand(1, 1, 4, 4), 2), {"order": 2}),
    ("ops", "unpatchify", (rand(1, 4, 8), 1, 4, 2), {}),
    ("ops", "l2norm_backward", (rand(3, 4), rand(3, 4), np.zeros(3, f32)), {"eps": 0.0}),
    ("ops", "wn_linear_forward", (rand(2, 4), np.zeros((3, 4), f32)), {}),
    ("ops", "wn_linear_backward", (rand(2, 3), rand(2, 4), rand(3, 4), np.zeros(3, f32)), {}),
    ("ops", "adamw_update", (P, P.copy(), P, P.copy()), {"lr": 1e-3, "t": 1}),
    ("ops", "adamw_update", (P.copy(), P.copy(), P.copy(), P.copy()), {"lr": 1e-3, "t": 0}),
    ("ops", "adamw_update", (P.copy(), P.copy(), P.copy(), P.copy()), {"t": 1}),
    ("ops", "sdpa_forward", (rand(1, 2, 12), 5), {}),
    ("ops", "sdpa_backward", (rand(1, 2, 4), rand(1, 2, 12), rand(1, 2, 4), rand(1, 3, 2), 2), {}),
    ("ops", "residual_layernorm_forward", (rand(3, 4), rand(4), rand(4)), {"b": rand(3, 5)}),
    ("ops", "layernorm_backward_residual", (rand(3, 4), rand(3, 4), rand(4), rand(3), rand(3)),
     {"dres": rand(4, 4)}),
    ("ops", "linear_forward_bf16", (rand(3, 4), rand(2, 5)), {}),
    ("objective", "sinkhorn_knopp", (np.full((2, 2), np.inf, f32),), {}),
    ("objective", "prototypes_update", (np.zeros((5, 4), f32).T, S), {}),
    ("objective", "paper_loss", (S, -C, ABN), {}),
    ("objective", "paper_loss", (S, C, ABN.astype(np.int32)), {}),
    ("objective", "recon_loss", (Y, rand(3, 4, 5), ABN), {}),
    ("objective", "released_loss", (S, C, ABN, Y, Y), {"iters": -1}),
    ("objective", "anomaly_score", (Y, rand(2, 4, 6)), {}),
    ("anomaly", "token_error", (Y, rand(3, 4, 5)), {}),
    ("anomaly", "position_stats", (np.ones((1, 3), f32),), {}),
    ("anomaly", "position_stats", (-np.ones((2, 3), f32),), {}),
    ("anomaly", "position_zscore", (np.ones((2, 3), f32), np.zeros(3, f32), np.zeros(3, f32)),
     {}),
    ("anomaly", "gauss_fit", (np.zeros((3, 1, 2), f32),), {}),
    ("anomaly", "gauss_fit", (np.full((3, 3, 2), np.nan, f32),), {}),
    ("anomaly", "gauss_score", (rand(2, 3, 2), rand(2, 2), rand(2, 2, 2)), {"pooled": True}),
    ("anomaly", "knn_score", (rand(2, 3, 2), rand(4, 3, 2)), {"k": 5}),
    ("slm", "slm_generate", (IMG[:, :, :16], 0), {"patch": 8}),
    ("slm", "slm_generate", (IMG, 0), {"patch": 5, "token_rule": "x"}),
]


def refusal(fn, args, kw):
    with pytest.raises(Exception) as e:
        fn(*args, **kw)
    return type(e.value), str(e.value)


@pytest.mark.parametrize("module,name,args,kw", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_cpu_refuses_with_a_message_naming_something(module, name, args, kw):
    exc, msg = refusal(getattr(getattr(_C, module), name), args, kw)
    assert exc in (TypeError, ValueError) and msg


def same_build():
    """afire._C_cuda was built beside afire._C (not, say, found through another checkout's
    editable install, as in .ci/sanitize.sh's CPU-only copy)."""
    spec = importlib.util.find_spec("afire._C_cuda")
    return spec is not None and os.path.dirname(spec.origin) == os.path.dirname(_C.__file__)


@pytest.mark.skipif(not cuda.compiled() or not same_build(),
                    reason="no CUDA backend built beside this afire._C")
@pytest.mark.parametrize("module,name,args,kw", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_gpu_twin_refuses_exactly_like_the_cpu(module, name, args, kw):
    want = refusal(getattr(getattr(_C, module), name), args, kw)
    assert refusal(getattr(cuda, name), args, kw) == want


def test_docstrings_come_from_the_signatures():
    assert _C.ops.linear_forward.__doc__.startswith(
        "linear_forward(inp[N,C], weight[OC,C], bias[OC]=None) -> out[N,OC]")
    doc = _C.objective.paper_loss.__doc__
    assert doc.startswith("paper_loss(s[B,L,K], C[L,K], abn[B,L]:labels, tau_s:float>0=0.1")
    assert "combined" not in doc.splitlines()[0]  # a GPU keyword: not in the CPU twin
    with pytest.raises(TypeError):
        _C.objective.paper_loss(S, C, ABN, combined=True)
