"""Encoder, projection head, decoder, AdamW/clip/EMA of afire._C.model (test preset).

Forward: against an independent float64 NumPy re-implementation that reads the weights by
their timm/MAE names (so the named table is checked too). Backward: every trainable tensor
of each network against central finite differences on 3 sampled elements per tensor
(float64 loss sums), plus the token gradients handed back to the encoder.
"""
import math

import numpy as np
import pytest

import afire  # noqa: F401  (loads OpenBLAS before the extension)
from afire._C import model, ops

NETS = ("encoder", "head", "decoder")


def make(**kw):
    kw.setdefault("seed", 3)
    return model.Networks("test", **kw)


def named(n, net, teacher=False):
    flat = n.params(net, teacher=teacher)
    return {name: flat[off:off + int(np.prod(shape))].reshape(shape).astype(np.float64)
            for name, off, shape, _, _ in n.named_parameters(net)}


# ---------------------------------------------------------------- NumPy reference (float64)

_erf = np.vectorize(math.erf)


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def layernorm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def sincos_mae(D, G):
    """MAE's get_2d_sincos_pos_embed(D, G, cls_token=True), written from its definition."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    gw, gh = np.meshgrid(np.arange(G, dtype=np.float32), np.arange(G, dtype=np.float32))
    emb = np.concatenate([one_d(D // 2, gw), one_d(D // 2, gh)], axis=1)
    return np.concatenate([np.zeros((1, D)), emb], axis=0)


def blocks_ref(P, prefix, x, depth, heads, eps):
    B, T, W = x.shape
    hd = W // heads
    for i in range(depth):
        g = lambda s: P[f"{prefix}.{i}.{s}"]  # noqa: E731
        h = layernorm(x, g("norm1.weight"), g("norm1.bias"), eps)
        qkv = (h @ g("attn.qkv.weight").T + g("attn.qkv.bias")).reshape(B, T, 3, heads, hd)
        q, k, v = (qkv[:, :, s].transpose(0, 2, 1, 3) for s in range(3))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        y = (a @ v).transpose(0, 2, 1, 3).reshape(B, T, W)
        x = x + y @ g("attn.proj.weight").T + g("attn.proj.bias")
        h = layernorm(x, g("norm2.weight"), g("norm2.bias"), eps)
        x = x + gelu(h @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")) @ g("mlp.fc2.weight").T \
            + g("mlp.fc2.bias")
    return x


def encoder_ref(P, img, cfg):
    B, C, S, _ = img.shape
    p = cfg["patch_size"]
    G = S // p
    patches = img.reshape(B, C, G, p, G, p).transpose(0, 2, 4, 1, 3, 5).reshape(B, G * G, -1)
    w = P["patch_embed.proj.weight"].reshape(cfg["embed_dim"], -1)
    emb = patches @ w.T + P["patch_embed.proj.bias"]
    pos = P["pos_embed"][0]
    cls = np.broadcast_to(P["cls_token"][0] + pos[:1], (B, 1, emb.shape[-1]))
    x = np.concatenate([cls, emb + pos[1:]], axis=1)
    x = blocks_ref(P, "blocks", x, cfg["depth"], cfg["num_heads"], 1e-6)
    return layernorm(x, P["norm.weight"], P["norm.bias"], 1e-6)


def head_ref(P, tokens, cfg):
    x = tokens[:, 1:]
    x = gelu(x @ P["mlp.0.weight"].T + P["mlp.0.bias"])
    x = gelu(x @ P["mlp.2.weight"].T + P["mlp.2.bias"])
    z = x @ P["mlp.4.weight"].T + P["mlp.4.bias"]
    zn = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    L = zn.shape[1]
    out = []
    for j in range(L):
        v = P["last_layer.weight_v"] if cfg["shared_last_layer"] else P[f"last_layers.{j}.weight_v"]
        out.append(zn[:, j] @ (v / np.linalg.norm(v, axis=1, keepdims=True)).T)
    return np.stack(out, axis=1)


def decoder_ref(P, tokens, mask, cfg):
    e = tokens @ P["decoder_embed.weight"].T + P["decoder_embed.bias"]
    mt = P["mask_token"][0]
    for b, j in zip(*np.nonzero(mask)):
        e[b, 1 + j] = mt[0 if cfg["shared_mask_token"] else j]
    x = e + P["decoder_pos_embed"][0]
    x = blocks_ref(P, "decoder_blocks", x, cfg["decoder_depth"], cfg["decoder_num_heads"], 1e-5)
    x = layernorm(x, P["decoder_norm.weight"], P["decoder_norm.bias"], 1e-5)
    return (x @ P["decoder_pred.weight"].T + P["decoder_pred.bias"])[:, 1:]


# ---------------------------------------------------------------- fixtures

def inputs(n, B=2, seed=0):
    cfg = n.config
    r = np.random.default_rng(seed)
    img = r.standard_normal((B, cfg["in_chans"], cfg["image_size"], cfg["image_size"]))
    mask = (r.random((B, cfg["num_patches"])) < 0.4).astype(np.uint8)
    mask[0, 0], mask[1, 0] = 1, 0
    return img.astype(np.float32), mask


VARIANTS = [dict(), dict(shared_last_layer=True, shared_mask_token=True, learned_pos=True),
            dict(in_chans=3)]


# ---------------------------------------------------------------- configuration & layout

def test_presets_sizes():
    n = make()
    c = n.config
    assert (c["embed_dim"], c["depth"], c["num_heads"], c["image_size"], c["patch_size"]) == \
        (32, 2, 2, 32, 8)
    assert (c["decoder_embed_dim"], c["decoder_depth"], c["decoder_num_heads"]) == (32, 1, 2)
    assert c["num_patches"] == 16 and c["num_tokens"] == 17


@pytest.mark.parametrize("kw,match", [
    (dict(image_size=30), "divisible by patch"),
    (dict(num_heads=3), "divisible by heads"),
    (dict(in_chans=2), "in_chans"),
    (dict(embed_dim=30, num_heads=3), "divisible by 4"),
    (dict(decoder_num_heads=5), "decoder"),
    (dict(depth=0), "depth"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        model.Networks("vit_huge")


@pytest.mark.parametrize("variant", VARIANTS[:2])
def test_named_table_covers_buffer(variant):
    n = make(**variant)
    for net in NETS:
        table = n.named_parameters(net)
        size = n.params(net).size
        cover = np.zeros(size, np.int32)
        for name, off, shape, decay, trainable in table:
            cover[off:off + int(np.prod(shape))] += 1
            # DINO's groups: no decay for biases and 1-D tensors; fixed buffers neither
            assert decay == (trainable and not name.endswith(".bias") and len(shape) > 1), name
        assert (cover == 1).all(), net
        assert len({t[0] for t in table}) == len(table)
    names = [t[0] for t in n.named_parameters("encoder")]
    assert "blocks.1.attn.qkv.weight" in names and "patch_embed.proj.weight" in names
    enc = dict((t[0], t) for t in n.named_parameters("encoder"))
    assert enc["blocks.1.attn.qkv.weight"][2] == (96, 32)
    assert enc["pos_embed"][4] == bool(variant.get("learned_pos", False))
    head = [t[0] for t in n.named_parameters("head")]
    if variant.get("shared_last_layer"):
        assert head[-1] == "last_layer.weight_v"
    else:
        assert head[-16:] == [f"last_layers.{j}.weight_v" for j in range(16)]


def test_init_statistics():
    n = model.Networks("test", embed_dim=256, num_heads=4, decoder_embed_dim=128, seed=11)
    P, Pd, Ph = named(n, "encoder"), named(n, "decoder"), named(n, "head")
    cfg = n.config
    assert abs(P["cls_token"].std() - 0.02) < 0.004
    assert abs(Pd["mask_token"].std() - 0.02) < 0.002
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "patch_embed.proj.weight"):
        w = P[name].reshape(P[name].shape[0], -1)
        bound = math.sqrt(6.0 / sum(w.shape))
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.98 * bound, name
        assert abs(w.var() - bound ** 2 / 3) < 0.05 * bound ** 2 / 3, name
    for name, t in list(P.items()) + list(Pd.items()):
        if name.endswith(".bias"):
            assert (t == 0).all(), name
        if "norm" in name and name.endswith(".weight"):
            assert (t == 1).all(), name
    assert abs(Ph["mlp.2.weight"].std() - 0.02) < 0.002
    v = Ph["last_layers.3.weight_v"]
    assert np.abs(v).max() <= 1 / math.sqrt(16) and v.std() > 0.8 / math.sqrt(3 * 16)
    G = cfg["image_size"] // cfg["patch_size"]
    np.testing.assert_array_equal(P["pos_embed"][0], ops.sincos_2d_embed(256, G, cls=True))
    np.testing.assert_allclose(P["pos_embed"][0], sincos_mae(256, G), atol=1e-6)
    np.testing.assert_allclose(Pd["decoder_pos_embed"][0], sincos_mae(128, G), atol=1e-6)
    # teacher starts equal; init is a pure function of the seed; different tensors differ
    for net in ("encoder", "head"):
        np.testing.assert_array_equal(n.params(net), n.params(net, teacher=True))
    m = model.Networks("test", embed_dim=256, num_heads=4, decoder_embed_dim=128, seed=11)
    np.testing.assert_array_equal(n.params("encoder"), m.params("encoder"))
    o = model.Networks("test", embed_dim=256, num_heads=4, decoder_embed_dim=128, seed=12)
    assert not np.array_equal(n.params("encoder"), o.params("encoder"))
    assert not np.allclose(P["blocks.0.attn.qkv.weight"][:32, :32],
                           P["blocks.1.attn.qkv.weight"][:32, :32])


def test_normalize_images():
    r = np.random.default_rng(0)
    img = r.integers(0, 256, (2, 8, 8), dtype=np.uint8)
    out = model.normalize_images(img)
    np.testing.assert_allclose(out[:, 0], (img / 255.0 - 0.449) / 0.226, rtol=1e-5, atol=1e-5)
    out3 = model.normalize_images(img, in_chans=3)
    for c, (mu, sd) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        np.testing.assert_allclose(out3[:, c], (img / 255.0 - mu) / sd, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="images"):
        model.normalize_images(img.astype(np.float32))
    with pytest.raises(ValueError, match="in_chans"):
        model.normalize_images(img, in_chans=2)


# ---------------------------------------------------------------- forward vs NumPy

@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_numpy(variant):
    n = make(**variant)
    cfg = n.config
    img, mask = inputs(n)
    tok = n.encoder_forward(img)
    ref = encoder_ref(named(n, "encoder"), img.astype(np.float64), cfg)
    np.testing.assert_allclose(tok, ref, rtol=1e-4, atol=1e-4)
    logits = n.head_forward(tok)
    np.testing.assert_allclose(logits, head_ref(named(n, "head"), tok.astype(np.float64), cfg),
                               rtol=1e-4, atol=1e-5)
    assert np.abs(logits).max() <= 1.0 + 1e-6  # cosine similarities
    pred = n.decoder_forward(tok, mask)
    np.testing.assert_allclose(pred, decoder_ref(named(n, "decoder"), tok.astype(np.float64),
                                                 mask, cfg), rtol=1e-4, atol=1e-4)
    assert pred.shape == (2, 16, 64 * cfg["in_chans"])
    # bool masks are accepted and equal
    np.testing.assert_array_equal(n.decoder_forward(tok, mask.astype(bool)), pred)


def test_teacher_branch_uses_teacher_weights():
    n = make()
    img, _ = inputs(n)
    s = n.encoder_forward(img)
    np.testing.assert_array_equal(n.encoder_forward(img, branch="teacher"), s)
    n.params("encoder", teacher=True)[:] *= 0.5
    t = n.encoder_forward(img, branch="teacher")
    assert not np.allclose(t, s)
    np.testing.assert_allclose(t, encoder_ref(named(n, "encoder", True), img.astype(np.float64),
                                              n.config), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(n.encoder_forward(img), s)  # student untouched
    lt = n.head_forward(t, branch="teacher")
    np.testing.assert_allclose(lt, head_ref(named(n, "head", True), t.astype(np.float64),
                                            n.config), rtol=1e-4, atol=1e-5)


def test_batch_sizes_change_and_one():
    n = make()
    img, mask = inputs(n, B=3)
    full = n.encoder_forward(img)
    one = n.encoder_forward(img[1:2])
    np.testing.assert_allclose(one[0], full[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(n.decoder_forward(full[:1], mask[:1])[0],
                               n.decoder_forward(full, mask)[0], rtol=1e-5, atol=1e-5)


def test_argument_validation():
    n = make()
    img, mask = inputs(n)
    with pytest.raises(TypeError, match="images"):
        n.encoder_forward(img.astype(np.float64))
    with pytest.raises(ValueError, match="images"):
        n.encoder_forward(img[:, :, :16])
    with pytest.raises(ValueError, match="branch"):
        n.encoder_forward(img, branch="ema")
    tok = n.encoder_forward(img)
    with pytest.raises(ValueError, match="tokens"):
        n.head_forward(tok[:, 1:])
    with pytest.raises(ValueError, match="token_mask"):
        n.decoder_forward(tok, mask[:, :5])
    with pytest.raises(ValueError, match="head_forward"):
        make().head_backward(np.zeros((2, 16, 16), np.float32))
    n.head_forward(tok)
    with pytest.raises(ValueError, match="dlogits"):
        n.head_backward(np.zeros((3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="dtokens"):
        n.encoder_backward(np.zeros((5, 17, 32), np.float32))
    with pytest.raises(ValueError, match="net"):
        n.params("student")
    with pytest.raises(ValueError, match="teacher"):
        n.params("decoder", teacher=True)


# ---------------------------------------------------------------- backward vs finite differences

def fd_compare(n, net, loss, sample=3, h=1e-2, seed=0, skip=()):
    """Central differences of `loss` (float64 sum) on `sample` elements of every trainable
    tensor of `net`, against the analytic n.grads(net) already accumulated."""
    grads = n.grads(net).copy()
    p = n.params(net)
    r = np.random.default_rng(seed)
    worst, checked = 0.0, 0
    for name, off, shape, _, trainable in n.named_parameters(net):
        if not trainable or name in skip:
            continue
        size = int(np.prod(shape))
        for k in r.choice(size, min(sample, size), replace=False):
            i = off + int(k)
            orig = p[i]
            p[i] = orig + h
            lp = loss()
            p[i] = orig - h
            lm = loss()
            p[i] = orig
            fd = (lp - lm) / (2 * h)
            err = abs(fd - grads[i]) / (2e-3 + 2e-2 * max(abs(fd), abs(grads[i])))
            assert err <= 1.0, (net, name, int(k), fd, float(grads[i]))
            worst = max(worst, err)
            checked += 1
    return checked


@pytest.mark.parametrize("variant", VARIANTS[:2])
def test_head_gradients(variant):
    n = make(**variant)
    img, _ = inputs(n)
    tok = n.encoder_forward(img)
    # At init z = mlp(x) has norm ~1e-3 (N(0, 0.02) weights) and is then L2-normalised, so
    # the loss curves on a scale far below any float32 finite-difference step; scale the MLP
    # weights up so that ||z|| ~ 1 (the gradient code is the same; init scale is covered by
    # the PyTorch fixture).
    P = n.params("head")
    for name, off, shape, _, _ in n.named_parameters("head"):
        if name.startswith("mlp.") and name.endswith(".weight"):
            P[off:off + int(np.prod(shape))] *= 12.0
    R = np.random.default_rng(1).standard_normal((2, 16, 16))
    loss = lambda: float((n.head_forward(tok).astype(np.float64) * R).sum())  # noqa: E731
    n.zero_grad()
    n.head_forward(tok)
    dtok = n.head_backward(R.astype(np.float32))
    assert fd_compare(n, "head", loss) >= 3 * 6 + (1 if variant else 16)
    assert (dtok[:, 0] == 0).all()  # cls is not used by the head
    r = np.random.default_rng(2)
    for _ in range(12):
        b, t, d = r.integers(2), r.integers(1, 17), r.integers(32)
        x = tok.copy()
        x[b, t, d] += 1e-2
        lp = float((n.head_forward(x).astype(np.float64) * R).sum())
        x[b, t, d] -= 2e-2
        lm = float((n.head_forward(x).astype(np.float64) * R).sum())
        assert abs((lp - lm) / 2e-2 - dtok[b, t, d]) <= 1e-2 + 2e-2 * abs(dtok[b, t, d])


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoder_gradients(variant):
    n = make(**variant)
    img, mask = inputs(n)
    tok = n.encoder_forward(img)
    Q = n.config["in_chans"] * 64
    R = np.random.default_rng(1).standard_normal((2, 16, Q))
    loss = lambda: float((n.decoder_forward(tok, mask).astype(np.float64) * R).sum())  # noqa
    n.zero_grad()
    n.decoder_forward(tok, mask)
    dtok = n.decoder_backward(R.astype(np.float32))
    fd_compare(n, "decoder", loss)
    # mask tokens of positions never masked in this batch get exactly zero gradient
    if not variant.get("shared_mask_token"):
        mt = dict((t[0], t) for t in n.named_parameters("decoder"))["mask_token"]
        g = n.grads("decoder")[mt[1]:mt[1] + 16 * 32].reshape(16, 32)
        unused = ~mask.any(0)
        assert (g[unused] == 0).all() and (np.abs(g[~unused]).sum(1) > 0).all()
    # replaced tokens pass no gradient to the encoder output
    b, j = np.argwhere(mask)[0]
    assert (dtok[b, 1 + j] == 0).all() and np.abs(dtok[:, 0]).sum() > 0
    r = np.random.default_rng(2)
    for _ in range(12):
        b, t, d = r.integers(2), r.integers(17), r.integers(32)
        x = tok.copy()
        x[b, t, d] += 1e-2
        lp = float((n.decoder_forward(x, mask).astype(np.float64) * R).sum())
        x[b, t, d] -= 2e-2
        lm = float((n.decoder_forward(x, mask).astype(np.float64) * R).sum())
        assert abs((lp - lm) / 2e-2 - dtok[b, t, d]) <= 1e-2 + 2e-2 * abs(dtok[b, t, d])


@pytest.mark.parametrize("variant", VARIANTS)
def test_encoder_gradients_through_head_and_decoder(variant):
    """The trainer's path: head and decoder token gradients summed into the encoder."""
    n = make(**variant)
    img, mask = inputs(n)
    r = np.random.default_rng(1)
    R1 = r.standard_normal((2, 16, 16))
    R2 = r.standard_normal((2, 16, 64 * n.config["in_chans"])) * 0.3
    R3 = r.standard_normal((2, 17, 32)) * 0.3  # a direct term on the tokens (cls included)

    def loss():
        tok = n.encoder_forward(img)
        return float((n.head_forward(tok).astype(np.float64) * R1).sum()
                     + (n.decoder_forward(tok, mask).astype(np.float64) * R2).sum()
                     + (tok.astype(np.float64) * R3).sum())

    n.zero_grad()
    tok = n.encoder_forward(img)
    n.head_forward(tok)
    n.decoder_forward(tok, mask)
    d = n.head_backward(R1.astype(np.float32)) + n.decoder_backward(R2.astype(np.float32))
    n.encoder_backward(d + R3.astype(np.float32))
    checked = fd_compare(n, "encoder", loss)
    assert checked >= 3 * 28
    assert np.abs(n.grads("encoder")).sum() > 0
    pe = dict((t[0], t) for t in n.named_parameters("encoder"))["pos_embed"]
    gpos = n.grads("encoder")[pe[1]:pe[1] + 17 * 32]
    assert (np.abs(gpos).sum() > 0) == bool(variant.get("learned_pos"))


def test_teacher_forward_between_does_not_disturb_backward():
    n = make()
    img, mask = inputs(n)
    R = np.random.default_rng(4).standard_normal((2, 17, 32)).astype(np.float32)
    n.zero_grad()
    n.encoder_forward(img)
    n.encoder_backward(R)
    g = n.grads("encoder").copy()
    n.zero_grad()
    n.params("encoder", teacher=True)[:] *= 0.9
    n.encoder_forward(img)
    t = n.encoder_forward(img[::-1].copy(), branch="teacher")
    n.head_forward(t, branch="teacher")
    n.encoder_backward(R)
    np.testing.assert_array_equal(n.grads("encoder"), g)


def test_backward_accumulates():
    n = make()
    img, _ = inputs(n)
    R = np.ones((2, 17, 32), np.float32)
    n.zero_grad()
    n.encoder_forward(img)
    n.encoder_backward(R)
    g1 = n.grads("encoder").copy()
    n.encoder_backward(R)
    np.testing.assert_allclose(n.grads("encoder"), 2 * g1, rtol=1e-5, atol=1e-6)
    n.zero_grad()
    assert not n.grads("encoder").any()


# ---------------------------------------------------------------- optimiser, clipping, EMA

def random_grads(n, seed=0, scale=1.0):
    r = np.random.default_rng(seed)
    for net in NETS:
        g = n.grads(net)
        g[:] = (r.standard_normal(g.size) * scale).astype(np.float32)


# the binding takes betas as float32, so 1 - beta2 is that of 0.999 rounded to float32
B1, B2 = float(np.float32(0.9)), float(np.float32(0.999))


def np_adamw(p, g, m, v, lr, wd, t, b1=B1, b2=B2, eps=1e-8):
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p, m, v


@pytest.mark.parametrize("freeze", [False, True])
def test_adamw_groups_several_steps(freeze):
    n = make()
    state = {net: [n.params(net).astype(np.float64), np.zeros(n.params(net).size),
                   np.zeros(n.params(net).size)] for net in NETS}
    for t, (lr, wd) in enumerate([(1e-2, 0.04), (5e-3, 0.1), (2e-3, 0.4)], start=1):
        random_grads(n, seed=t)
        for net in NETS:
            g = n.grads(net).astype(np.float64)
            p, m, v = state[net]
            for name, off, shape, decay, trainable in n.named_parameters(net):
                sl = slice(off, off + int(np.prod(shape)))
                if not trainable or (freeze and "last_layer" in name):
                    continue
                p[sl], m[sl], v[sl] = np_adamw(p[sl], g[sl], m[sl], v[sl], lr,
                                               wd if decay else 0.0, t)
        n.adamw_step(lr, wd, t, freeze_last_layer=freeze)
    for net in NETS:
        p, m, v = state[net]
        np.testing.assert_allclose(n.params(net), p, rtol=2e-5, atol=2e-6)
        nm, nv = n.moments(net)
        np.testing.assert_allclose(nm, m, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(nv, v, rtol=1e-5, atol=1e-9)
    # fixed sin-cos pos embeddings never move; frozen last layers keep zero moments
    enc = dict((t[0], t) for t in n.named_parameters("encoder"))
    off = enc["pos_embed"][1]
    assert not n.moments("encoder")[0][off:off + 17 * 32].any()
    head = dict((t[0], t) for t in n.named_parameters("head"))
    off = head["last_layers.0.weight_v"][1]
    assert (not n.moments("head")[0][off:off + 256].any()) == freeze


def test_adamw_rejects_bad_arguments():
    n = make()
    with pytest.raises(ValueError, match="t must be"):
        n.adamw_step(1e-3, 0.04, 0)
    with pytest.raises(ValueError, match="lr"):
        n.adamw_step(float("nan"), 0.04, 1)


def trainable_slices(n):
    for net in NETS:
        for name, off, shape, _, trainable in n.named_parameters(net):
            if trainable:
                yield net, name, slice(off, off + int(np.prod(shape)))


def test_clip_per_tensor():
    n = make()
    random_grads(n, seed=5, scale=0.05)
    before = {net: n.grads(net).astype(np.float64) for net in NETS}
    total, norms = n.clip_grad(3.0)
    expect_norms, expect_total = [], 0.0
    for (net, name, sl), got in zip(trainable_slices(n), norms):
        g = before[net][sl]
        nrm = np.linalg.norm(g)
        expect_norms.append(nrm)
        expect_total += nrm ** 2
        coef = 3.0 / (nrm + 1e-6)
        want = g * coef if coef < 1 else g
        np.testing.assert_allclose(n.grads(net)[sl], want, rtol=1e-5, atol=1e-8, err_msg=name)
    assert len(norms) == len(expect_norms)
    np.testing.assert_allclose(norms, expect_norms, rtol=1e-5)
    assert abs(total - math.sqrt(expect_total)) < 1e-4 * total
    assert (np.array(expect_norms) > 3).any() and (np.array(expect_norms) < 3).any()
    # untrainable buffers are left alone
    enc = dict((t[0], t) for t in n.named_parameters("encoder"))
    off = enc["pos_embed"][1]
    np.testing.assert_array_equal(n.grads("encoder")[off:off + 544], before["encoder"][off:off + 544])


@pytest.mark.parametrize("max_norm", [1.0, 1e6])
def test_clip_global(max_norm):
    n = make()
    random_grads(n, seed=6, scale=0.01)
    before = {net: n.grads(net).astype(np.float64) for net in NETS}
    tot = math.sqrt(sum((before[net][sl] ** 2).sum() for net, _, sl in trainable_slices(n)))
    got = n.clip_grad(max_norm, mode="global")
    assert abs(got - tot) < 1e-5 * tot
    coef = min(1.0, max_norm / (tot + 1e-6))
    for net, name, sl in trainable_slices(n):
        np.testing.assert_allclose(n.grads(net)[sl], before[net][sl] * coef, rtol=1e-5,
                                   atol=1e-9, err_msg=name)
    with pytest.raises(ValueError, match="mode"):
        n.clip_grad(1.0, mode="value")
    with pytest.raises(ValueError, match="max_norm"):
        n.clip_grad(-1.0)


def test_ema_update():
    n = make()
    random_grads(n, seed=7)
    n.adamw_step(1e-2, 0.0, 1)  # move the student away from the teacher
    for step, mom in enumerate([0.996, 0.9, 0.5]):
        t_before = {net: n.params(net, teacher=True).astype(np.float64) for net in NETS[:2]}
        n.ema_update(mom)
        for net in NETS[:2]:
            s = n.params(net).astype(np.float64)
            want = mom * t_before[net] + (1 - mom) * s
            np.testing.assert_allclose(n.params(net, teacher=True), want, rtol=1e-6, atol=1e-7)
        n.adamw_step(1e-2, 0.0, step + 2)
    n.sync_teacher()
    np.testing.assert_array_equal(n.params("head"), n.params("head", teacher=True))
    with pytest.raises(ValueError, match="momentum"):
        n.ema_update(1.5)
