import re

import numpy as np
import pytest

from afire import AFiRe
from afire.config import Config, PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_round_trip(name):
    c = Config.preset_config(name)
    assert c.img_size % c.patch_size == 0
    assert Config.from_json(c.to_json()) == c


def test_method_numbers():
    c = Config.preset_config("vit_base")
    assert (c.embed_dim, c.depth, c.num_heads, c.decoder_dim, c.decoder_depth) == (768, 12, 12, 512, 8)
    assert c.num_patches == 196
    assert c.lr == pytest.approx(5e-4 * 64 / 256)
    t = Config.preset_config("test")
    assert (t.img_size, t.patch_size, t.embed_dim, t.depth) == (32, 8, 32, 2)


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        Config.preset_config("test", img_size=30)
    with pytest.raises(ValueError, match="objective"):
        Config.preset_config("test", objective="mine")
    with pytest.raises(ValueError, match="unknown preset"):
        Config.preset_config("vit_huge")
    with pytest.raises(TypeError, match="depth"):
        Config.preset_config("test", depth=2.5)
    with pytest.raises(ValueError, match="w_recon"):
        Config.preset_config("test", w_recon=float("nan"))


def test_overrides():
    c = Config.preset_config("test").with_overrides(["epochs=3", "objective=released",
                                                     "slm_size=[8,16]", "base_lr=1"])
    assert c.epochs == 3 and c.objective == "released" and c.slm_size == (8, 16)
    assert isinstance(c.base_lr, float)
    with pytest.raises(ValueError, match="unknown config key"):
        Config.preset_config("test").with_overrides(["nope=1"])


# --------------------------------------------------------------- validation of every field

T = Config.preset_config("test")    # img_size 32, patch 8, embed_dim 32, 2 heads


@pytest.mark.parametrize("change, field, words", [
    (dict(embed_dim=0), "embed_dim", ">= 4"),
    (dict(mlp_ratio=0), "mlp_ratio", ">= 1"),
    (dict(mlp_ratio=-2), "mlp_ratio", ">= 1"),
    (dict(weight_decay=float("inf")), "weight_decay", "finite number >= 0"),
    (dict(weight_decay_end=-0.1), "weight_decay_end", ">= 0"),
    (dict(sinkhorn_iters=0), "sinkhorn_iters", "[1, 10000]"),
    (dict(slm_size=(4, 64)), "slm_size", "<= img_size 32"),
    (dict(slm_size=(8, 4)), "slm_size", "lo <= hi"),
    (dict(slm_crop=33), "slm_crop", "<= img_size 32"),
    (dict(slm_lesions=(0, 2)), "slm_lesions", "1 <= lo <= hi"),
    (dict(slm_lesions=(1, 65)), "slm_lesions", "<= 64"),
    (dict(slm_strength=1.5), "slm_strength", "[0, 1]"),
    (dict(slm_gamma2=0.0), "slm_gamma2", "> 0"),
    (dict(base_lr=float("inf")), "base_lr", "finite number > 0"),
    (dict(base_lr=float("nan")), "base_lr", "finite"),
    (dict(base_lr=0.0), "base_lr", "> 0"),
    (dict(min_lr=-1e-6), "min_lr", ">= 0"),
    (dict(clip_grad=float("inf")), "clip_grad", "finite"),
    (dict(tau_student=0.0), "tau_student", "> 0"),
    (dict(teacher_temp_final=float("inf")), "teacher_temp_final", "finite"),
    (dict(ema_momentum=1.5), "ema_momentum", "[0, 1]"),
    (dict(proto_momentum=-0.1), "proto_momentum", "[0, 1]"),
    (dict(adam_betas=(0.9, 1.0)), "adam_betas", "[0, 1)"),
    (dict(adam_eps=0.0), "adam_eps", "> 0"),
    (dict(w_abnormal=-1.0), "w_abnormal", ">= 0"),
    (dict(img_size=36), "img_size", "divisible by patch_size 8"),
    (dict(num_heads=3), "embed_dim", "divisible by num_heads 3"),
    (dict(decoder_heads=3), "decoder_dim", "divisible by decoder_heads 3"),
    (dict(embed_dim=30, num_heads=1), "embed_dim", "divisible by 4"),
    (dict(in_chans=2), "in_chans", "1 (grayscale) or 3"),
    (dict(num_prototypes=1), "num_prototypes", "[2, 65536]"),
    (dict(head_hidden=70000), "head_hidden", "[1, 65536]"),
    (dict(depth=0), "depth", ">= 1"),
    (dict(epochs=0), "epochs", ">= 1"),
    (dict(batch_size=0), "batch_size", ">= 1"),
    (dict(warmup_epochs=-1), "warmup_epochs", ">= 0"),
    (dict(seed=-1), "seed", ">= 0"),
    (dict(seed=2**31), "seed", "2^31"),
    (dict(img_size=8 * 257), "img_size", "at most 65536"),
    (dict(mlp_ratio=4096), "mlp_ratio", "<= 65536"),
    (dict(precision="fp16"), "precision", "'bf16' or 'fp32'"),
    (dict(clip_mode="norm"), "clip_mode", "'per_tensor' or 'global'"),
    (dict(token_rule="mine"), "token_rule", "'paper' or 'released'"),
])
def test_each_bad_value_is_rejected_with_its_field_name(change, field, words):
    with pytest.raises(ValueError) as e:
        T.replace(**change)
    msg = str(e.value)
    assert msg.startswith(f"Config: {field}="), msg
    assert words in msg, msg


@pytest.mark.parametrize("change, field", [
    (dict(depth=2.5), "depth"), (dict(embed_dim="32"), "embed_dim"),
    (dict(base_lr="1e-3"), "base_lr"), (dict(learned_pos_embed="yes"), "learned_pos_embed"),
    (dict(objective=1), "objective"), (dict(slm_size=(4,)), "slm_size"),
    (dict(slm_size=(4.5, 8)), "slm_size[0]"), (dict(extra={"a": object()}), "extra"),
    (dict(epochs=True), "epochs"),
])
def test_wrong_types_are_type_errors_naming_the_field(change, field):
    with pytest.raises(TypeError, match=f"Config: {re.escape(field)}="):
        T.replace(**change)


def test_edge_values_are_accepted_and_normalised():
    c = T.replace(sinkhorn_iters=1, slm_size=(32, 32), slm_crop=32, slm_lesions=(64, 64),
                  ema_momentum=1.0, proto_momentum=0.0, w_stru=0.0, w_cate=0, min_lr=0,
                  weight_decay=0.0, clip_grad=0.0, warmup_epochs=0, adam_betas=[0, 0.999],
                  teacher_temp_warmup_epochs=0, freeze_last_layer_epochs=0, seed=2**31 - 1,
                  slm_strength=1.0, embed_dim=np.int64(36), num_heads=np.int32(2),
                  base_lr=np.float32(0.5), learned_pos_embed=np.bool_(True))
    assert c.adam_betas == (0.0, 0.999) and type(c.adam_betas) is tuple
    assert type(c.embed_dim) is int and type(c.base_lr) is float and c.base_lr == 0.5
    assert type(c.w_cate) is float and type(c.learned_pos_embed) is bool
    assert Config.from_json(c.to_json()) == c
    AFiRe(Config.preset_config("test", sinkhorn_iters=1, slm_size=(32, 32)), steps_per_epoch=1)


def test_bad_json_fields_are_named():
    d = T.to_dict()
    with pytest.raises(TypeError, match="img_size"):
        Config.from_dict(dict(d, img_size="32"))
    with pytest.raises(ValueError, match="unknown keys"):
        Config.from_dict(dict(d, nope=1))


def test_overrides_parse_to_the_field_type_and_name_the_key():
    with pytest.raises(ValueError, match=r"base_lr=inf: must be a finite number > 0"):
        T.with_overrides(["base_lr=inf"])
    with pytest.raises(ValueError, match=r"base_lr=abc: must be a number"):
        T.with_overrides(["base_lr=abc"])
    with pytest.raises(ValueError, match=r"depth=x: must be an integer"):
        T.with_overrides(["depth=x"])
    with pytest.raises(ValueError, match=r"epochs=2.5: must be an integer"):
        T.with_overrides(["epochs=2.5"])
    with pytest.raises(ValueError, match=r"sinkhorn_iters=0: must be an integer in \[1"):
        T.with_overrides(["sinkhorn_iters=0"])
    with pytest.raises(ValueError, match="learned_pos_embed=maybe: must be true or false"):
        T.with_overrides(["learned_pos_embed=maybe"])
    with pytest.raises(ValueError, match=r"slm_size=\[8\]: must be a pair"):
        T.with_overrides(["slm_size=[8]"])
    with pytest.raises(ValueError, match="slm_size=.*<= img_size 32"):
        T.with_overrides(["slm_size=16,64"])
    with pytest.raises(ValueError, match="must look like key=value"):
        T.with_overrides(["base_lr"])
    with pytest.raises(ValueError, match="extra=.*JSON object"):
        T.with_overrides(["extra=[1]"])
    with pytest.raises(TypeError, match="list"):
        T.with_overrides("base_lr=1")
    c = T.with_overrides(["epochs=1e3", "per_position_last_layer=false", "slm_size=8,16",
                          "adam_betas=[0.8, 0.9]", "base_lr=2e-3", "objective=\"released\"",
                          " seed = 7", "extra={\"note\": \"x\"}", "learned_pos_embed=1"])
    assert c.epochs == 1000 and c.per_position_last_layer is False
    assert c.slm_size == (8, 16) and c.adam_betas == (0.8, 0.9) and c.base_lr == 2e-3
    assert c.objective == "released" and c.seed == 7 and c.extra == {"note": "x"}
    assert c.learned_pos_embed is True
