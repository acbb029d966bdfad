"""The PyTorch reference step of the GPU benchmark (benchmarks/torch_afire.py) computes
afire's losses from afire's weights: on the CPU in fp32, its first step's L_stru, L_cate,
L_recon, total loss and pre-clip gradient norm agree with afire's CPU step within 2e-4
relative, and its clipped gradients with cosine similarity > 0.9999 per network. Runs only
where torch is importable (it is not a dependency of afire)."""
import os
import sys

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import torch_afire  # noqa: E402


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(step=0, batch=6, seed=1),
    dict(per_position_last_layer=False, per_position_mask_token=False, in_chans=3,
         learned_pos_embed=True),
])
def test_torch_reference_matches_afire_on_the_cpu(overrides):
    torch.set_num_threads(2)
    out = torch_afire.check_against_afire(**overrides)
    assert set(out["grad_cosine"]) == {"encoder", "head", "decoder"}
