"""One AFiRe training step: afire's CUDA trainer vs the same step written in plain PyTorch.

Both sides run the paper objective (METHOD §3-§5) on identical shapes in ONE process:
  teacher encoder + head forward (no grad) on x -> Sinkhorn-Knopp (3 iterations) -> prototype
  update (C = m C + (1-m) mean_b q) -> student encoder + head + decoder forward on x' ->
  L_stru + L_cate (METHOD §4) + weighted L_recon -> backward -> per-tensor clipping (3.0)
  -> AdamW (no decay on biases / 1-D tensors) -> EMA of the teacher.
The PyTorch step is a straightforward, idiomatic implementation (nn.Linear, nn.LayerNorm,
F.scaled_dot_product_attention, exact GELU, fused AdamW, torch._foreach_* for clipping and
the EMA, per-position prototype layers as one batched einsum), in fp32 with TF32 OFF (as
afire) and with bf16 autocast. torch.compile is off unless --compile.

Differences, stated rather than hidden: afire draws the synthetic lesions (SLM) on the GPU
inside its step; the PyTorch step is handed x' and the abnormal-token mask precomputed by
afire's CPU SLM (uploaded every step, like the images), which slightly favours PyTorch. Both
sides upload the uint8 batch every step and return the loss to the host (one sync).
afire runs at epoch 20 of 100 (after warm-up and the first-epoch last-layer freeze) so both
sides update every tensor.

Memory: `gpu_mem_gib` is the device memory in use (cudaMemGetInfo) after the steps minus
before the model was built, for both sides (PyTorch's includes its caching allocator);
`torch_peak_allocated_gib` is torch.cuda.max_memory_allocated.

Prints ONE JSON object (and writes it to --out). Import torch BEFORE afire's CUDA backend.

    python3 benchmarks/bench_gpu_vs_torch.py [--presets vit_small,vit_base] [--batch 64]
        [--steps 5] [--warmup 2] [--compile] [--out bench_gpu_vs_torch.json]
    python3 benchmarks/bench_gpu_vs_torch.py --device cpu --presets test --batch 4 --steps 1
        (a CPU smoke run of the PyTorch step only, for machines without a GPU)
"""
import argparse
import copy
import dataclasses
import gc
import json
import math
import sys
import time

import torch  # first: torch's CUDA libraries must be loaded before afire's backend
import torch.nn as nn
import torch.nn.functional as F

import numpy as np  # noqa: E402

from afire import AFiRe, Config, cuda  # noqa: E402
from afire.model import synthetic_lesions  # noqa: E402
from _report import report  # noqa: E402

GRAY_MEAN, GRAY_STD = 0.449, 0.226


# ---------------------------------------------------------------------------- networks

class Block(nn.Module):
    """Pre-norm transformer block: LN -> MHSA (fused qkv) -> +, LN -> MLP (GELU) -> +."""

    def __init__(self, dim, heads, mlp_ratio, eps):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x):
        B, T, W = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, T, 3, self.heads, W // self.heads) \
            .permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, W)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def sincos_2d(dim, grid, cls):
    """Fixed 2-D sin-cos position embedding [1, cls + grid^2, dim] (MAE layout)."""
    d4 = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(d4, dtype=torch.float64) / d4)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                            torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for pos in (xs.reshape(-1), ys.reshape(-1)):
        out = pos[:, None] * omega[None]
        parts += [out.sin(), out.cos()]
    emb = torch.cat(parts, 1)
    if cls:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], 0)
    return emb[None].float()


class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        g = c.img_size // c.patch_size
        self.patch_embed = nn.Conv2d(c.in_chans, c.embed_dim, c.patch_size, c.patch_size)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, c.embed_dim))
        self.register_buffer("pos_embed", sincos_2d(c.embed_dim, g, True))
        self.blocks = nn.ModuleList(Block(c.embed_dim, c.num_heads, c.mlp_ratio, 1e-6)
                                    for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)

    def forward(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x + self.pos_embed[:, 1:]], 1)
        for b in self.blocks:
            x = b(x)
        return self.norm(x)


class Head(nn.Module):
    """MLP D -> H -> H -> bottleneck, L2-normalise, weight-normalised last layer (g = 1),
    one per token position (a batched einsum) or shared."""

    def __init__(self, c, L):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(c.embed_dim, c.head_hidden), nn.GELU(),
                                 nn.Linear(c.head_hidden, c.head_hidden), nn.GELU(),
                                 nn.Linear(c.head_hidden, c.head_bottleneck))
        n = L if c.per_position_last_layer else 1
        self.last_v = nn.Parameter(torch.randn(n, c.num_prototypes, c.head_bottleneck) * 0.02)

    def forward(self, tokens):
        z = F.normalize(self.mlp(tokens[:, 1:]), dim=-1)
        w = self.last_v / self.last_v.norm(dim=-1, keepdim=True)
        if w.shape[0] == 1:
            return z @ w[0].t()
        return torch.einsum("blh,lkh->blk", z, w)


class Decoder(nn.Module):
    def __init__(self, c, L):
        super().__init__()
        g = c.img_size // c.patch_size
        self.embed = nn.Linear(c.embed_dim, c.decoder_dim)
        n = L if c.per_position_mask_token else 1
        self.mask_token = nn.Parameter(0.02 * torch.randn(1, n, c.decoder_dim))
        self.register_buffer("pos_embed", sincos_2d(c.decoder_dim, g, True))
        self.blocks = nn.ModuleList(Block(c.decoder_dim, c.decoder_heads, c.mlp_ratio, 1e-5)
                                    for _ in range(c.decoder_depth))
        self.norm = nn.LayerNorm(c.decoder_dim, eps=1e-5)
        self.pred = nn.Linear(c.decoder_dim, c.patch_size ** 2 * c.in_chans)

    def forward(self, tokens, abn):
        x = self.embed(tokens)
        B, T, W = x.shape
        m = torch.cat([abn.new_zeros(B, 1), abn], 1)[..., None]
        mt = torch.cat([self.mask_token.new_zeros(1, 1, W),
                        self.mask_token.expand(1, T - 1, W)], 1).to(x.dtype)
        x = torch.where(m, mt, x) + self.pos_embed
        for b in self.blocks:
            x = b(x)
        return self.pred(self.norm(x))[:, 1:]


# ---------------------------------------------------------------------------- objective

@torch.no_grad()
def sinkhorn(logits, eps, iters):
    """Sinkhorn-Knopp on exp(logits / eps) over all N tokens: rows sum to 1, columns
    balanced over the K classes (METHOD §3)."""
    q = torch.exp((logits - logits.max()) / eps)
    q /= q.sum()
    N, K = q.shape
    for _ in range(iters):
        q /= q.sum(0, keepdim=True) * K
        q /= q.sum(1, keepdim=True) * N
    return q * N


def patchify(img, p):
    """[B,C,S,S] -> [B,L,P*P*C] in MAE order (row, column, channel)."""
    B, C, S, _ = img.shape
    g = S // p
    return img.reshape(B, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(B, g * g, p * p * C)


def paper_losses(s, C, abn, tau_s, tau):
    """L_stru (Eq. 12) and L_cate (Eq. 14-16) with log f(p, r) = (1/tau) <p, log r>."""
    B, L, K = s.shape
    logq = F.log_softmax(s / tau_s, -1)
    q = logq.exp()
    logc = (C / C.sum(-1, keepdim=True)).clamp_min(1e-30).log()
    A = torch.einsum("blk,mk->blm", q, logc.to(q.dtype)) / tau          # log f(q_bl, c_m)
    normal = ~abn
    l_stru = -(F.log_softmax(A.float(), -1).diagonal(dim1=1, dim2=2) * normal).sum() \
        / normal.sum().clamp_min(1)
    Fm = torch.einsum("ijk,bjk->jib", q, logq) / tau                    # log f(q_ij, q_bj)
    nT = normal.t()                                                      # [L, B]
    eye = torch.eye(B, dtype=torch.bool, device=s.device)
    pos = nT[:, None, :] & ~eye                                          # b != i, b normal
    both = pos | (~nT)[:, None, :]                                       # + b abnormal
    off = -1e4  # finite "minus infinity": no NaN gradients from empty sets
    a_jj = A.diagonal(dim1=1, dim2=2).t().masked_fill(nT, off)           # f(q_bj, c_j), b abn
    lpos = torch.logsumexp(Fm.masked_fill(~pos, off).float(), -1)
    lall = torch.logsumexp(torch.cat([Fm.masked_fill(~both, off),
                                      a_jj[:, None, :].expand(L, B, B)], -1).float(), -1)
    anchor = nT & pos.any(-1)
    l_cate = ((lall - lpos) * anchor).sum() / anchor.sum().clamp_min(1)
    return l_stru, l_cate


def recon_loss(pred, target, abn, w_abn):
    err = ((pred.float() - target) ** 2).sum(-1)
    w = torch.where(abn, torch.full_like(err, w_abn), torch.ones_like(err))
    return (w * err).sum() / pred.numel()


# ---------------------------------------------------------------------------- the step

class TorchAFiRe:
    def __init__(self, c, device, bf16=False, compile_=False):
        self.c, self.device, self.bf16 = c, device, bf16
        self.L = (c.img_size // c.patch_size) ** 2
        with torch.device(device):
            self.enc, self.head, self.dec = Encoder(c), Head(c, self.L), Decoder(c, self.L)
            self.t_enc, self.t_head = copy.deepcopy(self.enc), copy.deepcopy(self.head)
            self.protos = torch.zeros(self.L, c.num_prototypes)
        for p in list(self.t_enc.parameters()) + list(self.t_head.parameters()):
            p.requires_grad_(False)
        mods = (self.enc, self.head, self.dec)
        self.params = [p for m in mods for p in m.parameters()]
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": c.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=c.lr, betas=tuple(c.adam_betas), eps=c.adam_eps,
            fused=(device == "cuda"))
        self.student = [p for m in (self.enc, self.head) for p in m.parameters()]
        self.teacher = [p for m in (self.t_enc, self.t_head) for p in m.parameters()]
        self.first = True
        self.forward_loss = torch.compile(self._forward_loss) if compile_ else self._forward_loss

    def _normalize(self, x_u8):
        x = x_u8.to(self.device, non_blocking=True).float().div_(255.0)
        return ((x - GRAY_MEAN) / GRAY_STD)[:, None]

    def _forward_loss(self, img, img_p, abn, protos):
        c = self.c
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
            tok = self.enc(img_p)
            s = self.head(tok)
            pred = self.dec(tok, abn)
            l_stru, l_cate = paper_losses(s, protos, abn, c.tau_student, c.tau_similarity)
            l_recon = recon_loss(pred, patchify(img, c.patch_size), abn, c.w_abnormal)
        return c.w_stru * l_stru + c.w_cate * l_cate + c.w_recon * l_recon

    def step(self, x_u8, xp_u8, abn_u8):
        c = self.c
        img, img_p = self._normalize(x_u8), self._normalize(xp_u8)
        abn = abn_u8.to(self.device, non_blocking=True).bool()
        # teacher on the NORMAL image -> Sinkhorn -> prototypes
        with torch.no_grad(), torch.autocast(self.device, dtype=torch.bfloat16,
                                             enabled=self.bf16):
            t_logits = self.t_head(self.t_enc(img))
        q = sinkhorn(t_logits.float().reshape(-1, c.num_prototypes), c.teacher_temp,
                     c.sinkhorn_iters).reshape(t_logits.shape)
        with torch.no_grad():
            if self.first:
                self.protos.copy_(q.mean(0))
                self.first = False
            else:
                self.protos.mul_(c.proto_momentum).add_(q.mean(0), alpha=1 - c.proto_momentum)
        # student, losses, backward
        loss = self.forward_loss(img, img_p, abn, self.protos)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        # per-tensor clipping (METHOD §5), AdamW, EMA
        with torch.no_grad():
            grads = [p.grad for p in self.params if p.grad is not None]
            norms = torch.stack(torch._foreach_norm(grads))
            coef = (c.clip_grad / (norms + 1e-6)).clamp_(max=1.0)
            torch._foreach_mul_(grads, list(coef.unbind()))
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.teacher, self.student, 1.0 - c.ema_momentum)
        return loss.item()  # one host sync, as afire's step returns its losses


# ---------------------------------------------------------------------------- harness

def chest_like(n, s, seed):
    """Bright body, two darker lungs, noise (uint8), as tests/_util.phantom_like."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:s, 0:s] / s
    body = 170 + 40 * np.exp(-((xx - 0.5) ** 2) / 0.2)
    for cx in (0.3, 0.7):
        body = body - 90 * np.exp(-(((xx - cx) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2))
    imgs = body[None] + rng.normal(0, 6, (n, s, s))
    return np.clip(imgs, 0, 255).astype(np.uint8)


def used_bytes():
    free, total = torch.cuda.mem_get_info()
    return total - free


def timed(fn, steps, warmup, sync):
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return times, out


def row(name, preset, batch, times, loss, mem, extra=None):
    med = float(np.median(times))
    r = {"impl": name, "preset": preset, "batch": batch, "steps": len(times),
         "step_ms_median": med * 1e3, "step_ms_min": min(times) * 1e3,
         "images_per_s": batch / med, "gpu_mem_gib": mem / 2**30 if mem is not None else None,
         "last_loss": loss, "finite": bool(math.isfinite(loss))}
    r.update(extra or {})
    return r


def precision_values():
    """afire precision settings to try: fp32 always, bf16 when Config has the field."""
    names = {f.name for f in dataclasses.fields(Config)}
    return ["fp32", "bf16"] if "precision" in names else ["fp32"]


def afire_config(preset, batch, precision):
    base = dict(batch_size=batch, epochs=100)
    if precision == "fp32":
        try:
            return Config.preset_config(preset, precision="fp32", **base)
        except (TypeError, ValueError):
            return Config.preset_config(preset, **base)
    for spelling in ("bf16", "bfloat16"):
        try:
            return Config.preset_config(preset, precision=spelling, **base)
        except (TypeError, ValueError):
            continue
    raise ValueError("Config.precision accepts neither 'bf16' nor 'bfloat16'")


def bench_afire(preset, batch, precision, x, steps, warmup):
    cfg = afire_config(preset, batch, precision)
    gc.collect()
    torch.cuda.empty_cache()
    before = used_bytes()
    m = AFiRe(cfg, device="cuda", steps_per_epoch=1)
    m.step = 20  # past warm-up and the last-layer freeze: every tensor is updated
    times, out = timed(lambda: m.train_step(x), steps, warmup, lambda: None)  # noqa: F821
    mem = used_bytes() - before
    del m
    return row(f"afire_{precision}", preset, batch, times, out["loss"], mem)


def bench_torch(preset, batch, bf16, x, xp, abn, steps, warmup, device, compile_):
    cfg = Config.preset_config(preset, batch_size=batch, epochs=100)
    cuda_dev = device == "cuda"
    if cuda_dev:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = used_bytes()
    torch.manual_seed(0)
    t = TorchAFiRe(cfg, device, bf16=bf16, compile_=compile_)
    pin = cuda_dev
    xs = [torch.from_numpy(a) for a in (x, xp, abn)]
    if pin:
        xs = [a.pin_memory() for a in xs]
    sync = torch.cuda.synchronize if cuda_dev else (lambda: None)
    times, loss = timed(lambda: t.step(*xs), steps, warmup, sync)  # noqa: F821
    extra = {"compiled": compile_}
    mem = None
    if cuda_dev:
        mem = used_bytes() - before
        extra["torch_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del t
    return row("torch_bf16_autocast" if bf16 else "torch_fp32", preset, batch, times, loss,
               mem, extra)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="vit_small,vit_base")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile the student "
                    "forward + losses (off by default)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: smoke-run the PyTorch step only (no afire GPU rows)")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "torch sees no CUDA GPU"}))
        return 3
    # exact fp32 on both sides (afire's context keeps TF32 off)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    gpu = a.device == "cuda"
    afire_gpu = gpu and cuda.compiled() and cuda.device_count() > 0
    res = {"what": "AFiRe training step (paper objective): afire CUDA vs PyTorch, same shapes, "
                   "one process; fp32 = TF32 off",
           "torch": torch.__version__, "device": a.device,
           "gpu": torch.cuda.get_device_name(0) if gpu else None,
           "afire_precisions": precision_values() if afire_gpu else [],
           "rows": [], "ratios": {}}
    if gpu and not afire_gpu:
        res["afire_skipped"] = "afire has no CUDA backend or sees no GPU"
    for preset in [p.strip() for p in a.presets.split(",") if p.strip()]:
        cfg = Config.preset_config(preset, batch_size=a.batch)
        x = chest_like(a.batch, cfg.img_size, 0)
        # x' and the abnormal-token labels for the torch step: what afire's step 20 draws
        xp, _, abn = synthetic_lesions(cfg, x, step=20)
        jobs = []
        if afire_gpu:
            jobs += [lambda p=p: bench_afire(preset, a.batch, p, x, a.steps, a.warmup)
                     for p in res["afire_precisions"]]
        jobs += [lambda b=b: bench_torch(preset, a.batch, b, x, xp, abn, a.steps, a.warmup,
                                         a.device, a.compile) for b in (False, True)]
        rows = {}
        for job in jobs:
            try:
                r = job()
            except Exception as e:  # noqa: BLE001 - report and go on
                r = {"preset": preset, "error": f"{type(e).__name__}: {e}"}
            res["rows"].append(r)
            if "impl" in r:
                rows[r["impl"]] = r
            print(json.dumps(r), file=sys.stderr, flush=True)
        ratios = {}
        for ours in [k for k in rows if k.startswith("afire_")]:
            for ref in [k for k in rows if k.startswith("torch_")]:
                ratios[f"{ours}/{ref}"] = {
                    "images_per_s": rows[ours]["images_per_s"] / rows[ref]["images_per_s"],
                    "gpu_mem": (rows[ours]["gpu_mem_gib"] / rows[ref]["gpu_mem_gib"]
                                if rows[ours]["gpu_mem_gib"] and rows[ref]["gpu_mem_gib"]
                                else None)}
        res["ratios"][preset] = ratios
    return report(res, a.out)


if __name__ == "__main__":
    sys.exit(main())
