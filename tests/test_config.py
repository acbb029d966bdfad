import pytest

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
