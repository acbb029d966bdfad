"""Bad input at every kind of afire._C entry point: each class of mistake gets the documented
exception (dtype -> TypeError, shape/value -> ValueError naming the argument, impossible
sizes -> ValueError/MemoryError, busy -> RuntimeError), never a crash or a silent result.
docs/RELIABILITY.md has the per-entry-point table these tests sample."""
import math

import numpy as np
import pytest

from _util import phantom_like, small_cfg
from afire import AFiRe, _C

ops, obj, slm, io = _C.ops, _C.objective, _C.slm, _C.io
f32 = np.float32


@pytest.fixture(scope="module")
def model():
    return AFiRe(small_cfg(), steps_per_epoch=2)


@pytest.fixture(scope="module")
def nets():
    return _C.model.Networks("test")


# ---------------------------------------------------------------- dtype -> TypeError

@pytest.mark.parametrize("call", [
    lambda: ops.linear_forward(np.ones((2, 3)), np.ones((4, 3), f32)),          # float64
    lambda: ops.gelu_forward([1.0, 2.0]),                                       # a list
    lambda: ops.softmax_forward(None),
    lambda: obj.sinkhorn_knopp(np.ones((2, 3), np.int32)),
    lambda: obj.paper_loss(np.ones((1, 2, 3), f32), np.ones((2, 3), f32),
                           np.zeros((1, 2), np.int64)),                         # abn int64
    lambda: slm.slm_generate(np.ones((1, 16, 16), f32), 0),
    lambda: _C.model.normalize_images(np.ones((1, 8, 8), f32)),
    lambda: io.save_safetensors("/tmp/x.safetensors", {"a": np.array(["s"], object)}),
    lambda: io.save_safetensors("/tmp/x.safetensors", {1: np.ones(2, f32)}),
    lambda: _C.Tensor(np.ones(3, np.float64)),
    lambda: _C.trainer.Trainer([], 1, 1),
], ids=lambda f: "")
def test_wrong_dtype_or_type_is_type_error(call):
    with pytest.raises(TypeError):
        call()


def test_model_rejects_non_uint8_images(model):
    with pytest.raises(TypeError, match="uint8"):
        model.train_step(phantom_like(2).astype(np.float32))
    with pytest.raises(TypeError, match="images"):
        model._t.encode(phantom_like(2).astype(np.int16))


# ---------------------------------------------------------------- rank / shape -> ValueError

@pytest.mark.parametrize("call,name", [
    (lambda: ops.linear_forward(np.ones(3, f32), np.ones((4, 3), f32)), "inp"),
    (lambda: ops.linear_forward(np.ones((2, 3), f32), np.ones((4, 5), f32)), "weight"),
    (lambda: ops.attention_forward(np.ones((1, 4, 10), f32), 2), "qkv"),
    (lambda: ops.patchify_forward(np.ones((1, 1, 8, 6), f32), 2), "img"),
    (lambda: obj.recon_loss(np.ones((1, 2, 3), f32), np.ones((1, 2, 4), f32),
                            np.zeros((1, 2), np.uint8)), "x"),
    (lambda: obj.paper_loss(np.ones((1, 2, 3), f32), np.ones((3, 3), f32),
                            np.zeros((1, 2), np.uint8)), "C"),
    (lambda: slm.slm_generate(np.ones((1, 16, 8), np.uint8), 0), "square"),
    (lambda: slm.slm_generate(np.ones((1, 16, 16), np.uint8), 0, patch=5), "patch"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_wrong_rank_or_shape_is_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_shapes_are_checked_against_the_config(model, nets):
    S = model.cfg.img_size
    with pytest.raises(ValueError, match="images"):
        model._t.train_step(np.zeros((2, S, S + 1), np.uint8))
    with pytest.raises(ValueError, match="capacity"):
        model._t.train_step(np.zeros((model.batch_capacity + 1, S, S), np.uint8))
    with pytest.raises(ValueError, match="token_mask"):
        model._t.restore(np.zeros((2, S, S), np.uint8), np.zeros((2, 3), np.uint8))
    c = nets.config
    with pytest.raises(ValueError, match="images"):
        nets.encoder_forward(np.zeros((1, 3, c["image_size"], c["image_size"]), f32))
    with pytest.raises(ValueError, match="dlogits"):
        nets.head_forward(np.zeros((1, c["num_tokens"], c["embed_dim"]), f32))
        nets.head_backward(np.zeros((1, c["num_patches"], c["out_dim"] + 1), f32))


# ---------------------------------------------------------------- empty inputs

@pytest.mark.parametrize("call", [
    lambda: ops.linear_forward(np.ones((0, 3), f32), np.ones((4, 3), f32)),
    lambda: obj.sinkhorn_knopp(np.ones((0, 3), f32)),
    lambda: obj.anomaly_score(np.ones((1, 0, 3), f32), np.ones((1, 0, 3), f32)),
    lambda: slm.otsu_threshold(np.zeros((0,), np.uint8)),
])
def test_empty_arrays_are_value_errors(call):
    with pytest.raises(ValueError):
        call()


def test_empty_batch_is_refused_by_the_model(model):
    with pytest.raises(ValueError, match="empty"):
        model.encode(np.zeros((0, 32, 32), np.uint8))


# ---------------------------------------------------------------- size arithmetic

@pytest.mark.parametrize("call", [
    lambda: ops.patchify_backward(np.ones((1, 1, 1), f32), 1 << 20, 1 << 20, 1 << 20),
    lambda: ops.sincos_2d_embed(4, 1 << 30),
    lambda: _C.rng.uniform(1 << 62),
    lambda: _C.Tensor.zeros((1 << 62, 1 << 62)),
    lambda: _C.Tensor.zeros((1 << 40,)),
    lambda: _C.phantom.generate(1 << 40, size=64),
    lambda: _C.model.Networks("test", image_size=1 << 20, patch_size=1),
], ids=lambda f: "")
def test_sizes_that_overflow_or_cannot_fit_fail_cleanly(call):
    with pytest.raises((ValueError, MemoryError)):
        call()


def test_int_arguments_out_of_c_range_raise_overflow_or_value_error():
    with pytest.raises((OverflowError, ValueError)):
        ops.attention_forward(np.ones((1, 2, 6), f32), 1 << 40)
    with pytest.raises((OverflowError, ValueError)):
        _C.rng.integers(3, 0, 1 << 40)           # high - low >= 2**32
    with pytest.raises(OverflowError):
        slm.slm_generate(np.zeros((1, 16, 16), np.uint8), -1)


# ---------------------------------------------------------------- NaN / Inf

@pytest.mark.parametrize("call,name", [
    (lambda a: obj.sinkhorn_knopp(a), "logits"),
    (lambda a: obj.anomaly_score(a[None], np.zeros((1,) + a.shape, f32)), "y"),
    (lambda a: obj.recon_loss(np.zeros((1,) + a.shape, f32), a[None],
                              np.zeros((1, a.shape[0]), np.uint8)), "x"),
])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_objective_rejects_non_finite_inputs(call, name, bad):
    a = np.ones((3, 4), f32)
    a[1, 2] = bad
    with pytest.raises(ValueError, match=name):
        call(a)


def test_layer_kernels_propagate_non_finite_values():
    # documented choice: the ops are raw kernels (used inside the step, where the loss check
    # catches divergence), so NaN flows through instead of being scanned for at every call
    x = np.ones((2, 3), f32)
    x[0, 1] = np.nan
    out = ops.linear_forward(x, np.ones((4, 3), f32))
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


@pytest.mark.parametrize("kw", [dict(lr=math.nan, t=1), dict(lr=1e-3, t=1, eps=math.inf),
                                dict(lr=1e-3, t=1, beta1=1.0), dict(lr=1e-3, t=0)])
def test_optimizer_hyperparameters_are_checked(kw):
    p, g, m, v = (np.zeros(4, f32) for _ in range(4))
    with pytest.raises(ValueError):
        ops.adamw_update(p, g, m, v, **kw)


def test_network_scalars_reject_nan(nets):
    with pytest.raises(ValueError):
        nets.ema_update(math.nan)
    with pytest.raises(ValueError):
        nets.clip_grad(max_norm=math.nan)
    with pytest.raises(ValueError):
        nets.adamw_step(math.nan, 0.0, 1)


# ---------------------------------------------------------------- labels / indices / choices

def test_out_of_range_labels_and_choices():
    s = np.zeros((1, 2, 3), f32)
    with pytest.raises(ValueError, match="abn"):
        obj.paper_loss(s, np.full((2, 3), 1 / 3, f32), np.array([[0, 2]], np.uint8))
    with pytest.raises(ValueError, match="m must be"):
        obj.prototypes_update(np.zeros((2, 3), f32), s, m=1.5)
    with pytest.raises(ValueError, match="lesion"):
        _C.phantom.generate(1, size=64, lesion="tumour")
    with pytest.raises(ValueError, match="token_rule"):
        slm.size_range(64, token_rule="nope")
    with pytest.raises(ValueError, match="order"):
        ops.patchify_forward(np.ones((1, 1, 4, 4), f32), 2, 7)
    with pytest.raises(ValueError, match="net"):
        _C.model.Networks("test").params("encoder2")


# ---------------------------------------------------------------- in-place arguments

def test_in_place_arguments_must_be_writeable_and_contiguous():
    p = np.zeros(8, f32)
    with pytest.raises(ValueError, match="params"):
        ops.adamw_update(p[::2], np.zeros(4, f32), np.zeros(4, f32), np.zeros(4, f32),
                         lr=1e-3, t=1)
    ro = np.zeros(4, f32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="m must"):
        ops.adamw_update(np.zeros(4, f32), np.zeros(4, f32), ro, np.zeros(4, f32), lr=1e-3, t=1)
    C = np.zeros((4, 3), f32)
    with pytest.raises(ValueError, match="in place"):
        obj.prototypes_update(C[::2], np.zeros((1, 2, 3), f32))


def test_non_contiguous_read_only_inputs_are_copied_not_rejected():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5)).astype(f32)
    w = rng.normal(size=(5, 4)).astype(f32).T  # a transposed (F-order) view
    ref = ops.linear_forward(x, np.ascontiguousarray(w))
    np.testing.assert_array_equal(ops.linear_forward(x[::1], w), ref)
    np.testing.assert_array_equal(ops.linear_forward(np.asfortranarray(x), w), ref)


# ---------------------------------------------------------------- objects and configs

def test_objects_cannot_be_reinitialised(model):
    n = _C.model.Networks("test")
    view = n.params("encoder")
    with pytest.raises(RuntimeError, match="already initialised"):
        n.__init__("test")
    view[:] = 1.0  # the buffer the view points into is still alive
    assert (n.params("encoder") == 1.0).all()
    with pytest.raises(RuntimeError, match="already initialised"):
        model._t.__init__(model.cfg.to_dict(), 2, 2)


def test_uninitialised_objects_raise_instead_of_crashing():
    n = _C.model.Networks.__new__(_C.model.Networks)
    with pytest.raises(RuntimeError, match="not initialised"):
        n.params("encoder")
    t = _C.trainer.Trainer.__new__(_C.trainer.Trainer)
    with pytest.raises(RuntimeError, match="not initialised"):
        t.train_step(np.zeros((1, 32, 32), np.uint8))
    with pytest.raises(RuntimeError, match="not initialised"):
        t.step = 3


@pytest.mark.parametrize("key,value,exc", [
    ("slm_lesions", (1e30, 2), ValueError),        # would be UB as a C int cast
    ("slm_size", (4.5, 8), ValueError),
    ("slm_lesions", "ab", TypeError),
    ("ema_momentum", 1.5, ValueError),
    ("proto_momentum", -0.1, ValueError),
    ("w_recon", -1.0, ValueError),
    ("base_lr", math.nan, ValueError),
    ("teacher_temp", 0.0, ValueError),
    ("adam_betas", (0.9, 1.0), ValueError),
    ("warmup_epochs", -1, ValueError),
    ("epochs", 0, ValueError),
    ("img_size", 1 << 40, ValueError),
    ("depth", True, TypeError),
    ("objective", "both", ValueError),
])
def test_trainer_config_dict_is_validated_in_c(key, value, exc):
    d = small_cfg().to_dict()
    d[key] = value
    with pytest.raises(exc):
        _C.trainer.Trainer(d, 2, 2)


def test_trainer_config_missing_key_and_bad_steps():
    d = small_cfg().to_dict()
    del d["tau_student"]
    with pytest.raises(KeyError, match="tau_student"):
        _C.trainer.Trainer(d, 2, 2)
    d = small_cfg().to_dict()
    for spe in (0, 1 << 40):
        with pytest.raises(ValueError, match="steps_per_epoch"):
            _C.trainer.Trainer(d, 2, spe)
    with pytest.raises(ValueError, match="batch"):
        _C.trainer.Trainer(d, 0, 2)


def test_step_setter_validates(model):
    with pytest.raises(ValueError):
        model._t.step = -1
    with pytest.raises(AttributeError):
        del model._t.step
    with pytest.raises(TypeError):
        model._t.step = "3"
