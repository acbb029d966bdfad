"""AFiRe's training step in plain PyTorch: the reference that bench_gpu_vs_torch.py times
against afire. It starts from afire's own weights (``TorchAFiRe.from_afire``), reads afire's
synthetic lesions and schedule values, and computes the paper objective as afire's C code
does, so both sides produce the same losses; ``check_against_afire`` verifies that on the CPU
(tests/test_torch_reference.py runs it wherever torch is importable).

The step (METHOD §3-§5, paper objective), idiomatic PyTorch: nn.Linear, nn.LayerNorm,
F.scaled_dot_product_attention, exact GELU, fused AdamW on the GPU, torch._foreach_* for the
per-tensor clipping and the EMA, the per-position last layers as one batched einsum:
  teacher encoder + head on x (no grad) -> Sinkhorn-Knopp (eps = the teacher temperature of
  the step, afire's normalisation) -> prototypes (overwritten on the first step, then
  m C + (1-m) mean_b q) -> student encoder + head + decoder on x' -> L_stru (Eq. 12) + L_cate
  (Eq. 14-16) + L_recon (Eq. 20) -> backward -> per-tensor clipping -> AdamW (decay where
  afire's parameter table says so) -> EMA of the teacher.
Stated differences: lr, weight decay, EMA momentum and teacher temperature are constants (the
values of afire's schedule at the step the benchmark starts from, ``schedule=``), and AdamW
counts its own steps from 1 where afire's bias correction uses the global step; so the losses
are equal at the first step and drift apart slowly after it. The synthetic lesions are
precomputed by afire's CPU SLM and uploaded with the images.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from chest_images import chest_like

# afire's input normalisation (csrc/core/params.c): gray, or gray replicated with ImageNet's
GRAY = ((0.449,), (0.226,))
RGB = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ---------------------------------------------------------------------------- networks
# Module names are timm's / MAE's, as afire's parameter tables, so loading is by name.

class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, W = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, W)
        return self.proj(y)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, dim, heads, mlp_ratio, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_ratio * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.proj = nn.Conv2d(c.in_chans, c.embed_dim, c.patch_size, c.patch_size)

    def forward(self, img):
        return self.proj(img).flatten(2).transpose(1, 2)


class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        T = (c.img_size // c.patch_size) ** 2 + 1
        self.patch_embed = PatchEmbed(c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        pos = torch.zeros(1, T, c.embed_dim)
        if c.learned_pos_embed:
            self.pos_embed = nn.Parameter(pos)
        else:
            self.register_buffer("pos_embed", pos)
        self.blocks = nn.ModuleList(Block(c.embed_dim, c.num_heads, c.mlp_ratio, 1e-6)
                                    for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)

    def forward(self, img):
        x = self.patch_embed(img) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], 1)
        for b in self.blocks:
            x = b(x)
        return self.norm(x)


class Head(nn.Module):
    """MLP D -> Hh -> Hh -> Bn (exact GELU), L2-normalise, weight-normalised last layer
    (g = 1): one per token position (a batched einsum) or shared."""

    def __init__(self, c, L):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(c.embed_dim, c.head_hidden), nn.GELU(),
                                 nn.Linear(c.head_hidden, c.head_hidden), nn.GELU(),
                                 nn.Linear(c.head_hidden, c.head_bottleneck))
        n = L if c.per_position_last_layer else 1
        self.last_v = nn.Parameter(torch.zeros(n, c.num_prototypes, c.head_bottleneck))

    def forward(self, tokens):
        z = F.normalize(self.mlp(tokens[:, 1:]), dim=-1)
        w = self.last_v / self.last_v.norm(dim=-1, keepdim=True)
        if w.shape[0] == 1:
            return z @ w[0].t()
        return torch.einsum("blh,lkh->blk", z, w)


class Decoder(nn.Module):
    def __init__(self, c, L):
        super().__init__()
        n = L if c.per_position_mask_token else 1
        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, n, c.decoder_dim))
        self.register_buffer("decoder_pos_embed", torch.zeros(1, L + 1, c.decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(c.decoder_dim, c.decoder_heads, c.mlp_ratio, 1e-5)
            for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(c.decoder_dim, eps=1e-5)
        self.decoder_pred = nn.Linear(c.decoder_dim, c.patch_size ** 2 * c.in_chans)

    def forward(self, tokens, abn):
        x = self.decoder_embed(tokens)
        B, T, W = x.shape
        m = torch.cat([abn.new_zeros(B, 1), abn], 1)[..., None]
        mt = torch.cat([self.mask_token.new_zeros(1, 1, W),
                        self.mask_token.expand(1, T - 1, W)], 1).to(x.dtype)
        x = torch.where(m, mt, x) + self.decoder_pos_embed
        for b in self.decoder_blocks:
            x = b(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


# ---------------------------------------------------------------------------- objective

@torch.no_grad()
def sinkhorn(logits, eps, iters):
    """afire's Sinkhorn-Knopp (objective.c): exp((logits - global max) / eps) normalised to
    total 1; `iters` times columns -> 1/K, rows -> 1/N; rows finally scaled to sum 1."""
    q = torch.exp((logits.double() - logits.max()) / eps)
    q /= q.sum()
    N, K = q.shape
    for _ in range(iters):
        q /= q.sum(0, keepdim=True) * K
        q /= q.sum(1, keepdim=True) * N
    return (q / q.sum(1, keepdim=True)).float()


def patchify(img, p):
    """[B,C,S,S] -> [B,L,P*P*C] in MAE order (row, column, channel)."""
    B, C, S, _ = img.shape
    g = S // p
    return img.reshape(B, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(B, g * g, p * p * C)


def paper_losses(s, protos, abn, tau_s, tau):
    """L_stru (Eq. 12) and L_cate (Eq. 14-16) as objective.c: log f(p, r) = (1/tau) <p, log r>,
    c_l = C_l / sum(C_l) clamped to 1e-12 before the log, q = softmax(s / tau_s)."""
    B, L, K = s.shape
    logq = F.log_softmax(s.float() / tau_s, -1)
    q = logq.exp()
    c = protos / protos.sum(-1, keepdim=True)
    logc = c.clamp_min(1e-12).log()
    A = torch.einsum("blk,mk->blm", q, logc) / tau                      # log f(q_bl, c_m)
    normal = ~abn
    l_stru = -(F.log_softmax(A, -1).diagonal(dim1=1, dim2=2) * normal).sum() \
        / normal.sum().clamp_min(1)
    Fm = torch.einsum("ijk,bjk->jib", q, logq) / tau                    # log f(q_ij, q_bj)
    nT = normal.t()                                                      # [L, B]
    eye = torch.eye(B, dtype=torch.bool, device=s.device)
    pos = nT[:, None, :] & ~eye                                          # b != i, b normal
    neg = (~nT)[:, None, :].expand(L, B, B)                              # b abnormal
    off = -1e4  # "minus infinity" that keeps the gradients finite
    a_jj = A.diagonal(dim1=1, dim2=2).t().masked_fill(nT, off)           # f(q_bj, c_j), b abn
    lpos = torch.logsumexp(Fm.masked_fill(~pos, off), -1)
    lall = torch.logsumexp(torch.cat([Fm.masked_fill(~(pos | neg), off),
                                      a_jj[:, None, :].expand(L, B, B)], -1), -1)
    anchor = nT & pos.any(-1)
    l_cate = ((lall - lpos) * anchor).sum() / anchor.sum().clamp_min(1)
    return l_stru, l_cate


def recon_loss(pred, target, abn, w_abn):
    """Eq. 20: mean over tokens of w ||y - x||^2 / Q (w = w_abn on abnormal tokens)."""
    err = ((pred.float() - target) ** 2).sum(-1)
    w = torch.where(abn, torch.full_like(err, w_abn), torch.ones_like(err))
    return (w * err).sum() / pred.numel()


# ---------------------------------------------------------------------------- the step

class TorchAFiRe:
    """The AFiRe step on `device`; bf16: autocast; compile_: torch.compile the teacher
    forward and the student forward + losses (the backward through AOTAutograd).
    schedule: {'lr', 'wd', 'ema', 'teacher_temp'} constants (default: the config's peak
    values); decay: {parameter name: bool} (default: ndim >= 2)."""

    def __init__(self, c, device, bf16=False, compile_=False, schedule=None, decay=None):
        self.c, self.device, self.bf16 = c, device, bf16
        self.L = (c.img_size // c.patch_size) ** 2
        s = dict(lr=c.lr, wd=c.weight_decay, ema=c.ema_momentum, teacher_temp=c.teacher_temp)
        s.update(schedule or {})
        self.sched = s
        mean, std = GRAY if c.in_chans == 1 else RGB
        with torch.device(device):
            self.enc, self.head, self.dec = Encoder(c), Head(c, self.L), Decoder(c, self.L)
            self.t_enc, self.t_head = copy.deepcopy(self.enc), copy.deepcopy(self.head)
            self.protos = torch.zeros(self.L, c.num_prototypes)
            self.mean = torch.tensor(mean).view(1, -1, 1, 1)
            self.std = torch.tensor(std).view(1, -1, 1, 1)
        for p in list(self.t_enc.parameters()) + list(self.t_head.parameters()):
            p.requires_grad_(False)
        self.nets = {"encoder": self.enc, "head": self.head, "decoder": self.dec}
        self.params = [p for m in self.nets.values() for p in m.parameters()]
        self.first = True
        self.make_optimizer(decay)
        self.student = [p for m in (self.enc, self.head) for p in m.parameters()]
        self.teacher = [p for m in (self.t_enc, self.t_head) for p in m.parameters()]
        self.forward_teacher = self._forward_teacher
        self.forward_loss = self._forward_loss
        if compile_:
            self.forward_teacher = torch.compile(self._forward_teacher)
            self.forward_loss = torch.compile(self._forward_loss)

    def make_optimizer(self, decay=None):
        names = {id(p): f"{net}.{n}" for net, m in self.nets.items()
                 for n, p in m.named_parameters()}
        def decays(p):
            return decay[names[id(p)]] if decay is not None else p.ndim >= 2
        groups = [{"params": [p for p in self.params if decays(p)],
                   "weight_decay": self.sched["wd"]},
                  {"params": [p for p in self.params if not decays(p)], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=self.sched["lr"], betas=tuple(self.c.adam_betas),
                                     eps=self.c.adam_eps, fused=self.device == "cuda")

    # ---- afire's weights
    @classmethod
    def from_afire(cls, model, device, **kw):
        """A reference with `model`'s (an afire.AFiRe) configuration, student and teacher
        weights, AdamW decay groups and (by default) the schedule values of its next step."""
        kw.setdefault("schedule", None)
        decay = {}
        for net in ("encoder", "head", "decoder"):
            for e in model._t.param_table(net):
                if e["trainable"]:
                    decay[f"{net}.{torch_name(e['name'])}"] = bool(e["decay"])
        t = cls(model.cfg, device, decay=decay, **kw)
        t.load_afire(model)
        return t

    def load_afire(self, model):
        """Copy every tensor of afire's flat buffers (student, teacher) into the modules."""
        bufs = model._t.buffers()
        with torch.no_grad():
            for net in ("encoder", "head", "decoder"):
                table = model._t.param_table(net)
                for prefix, mods in (("student", self.nets),
                                     ("teacher", {"encoder": self.t_enc, "head": self.t_head})):
                    if net not in mods:
                        continue
                    flat = bufs[f"{prefix}.{net}"]
                    state = dict(mods[net].named_parameters())
                    state.update(dict(mods[net].named_buffers()))
                    lasts = []
                    for e in table:
                        n = int(np.prod(e["shape"]))
                        v = torch.from_numpy(flat[e["offset"]:e["offset"] + n].copy())
                        name = torch_name(e["name"])
                        if name == "last_v":
                            lasts.append(v.view(e["shape"]))
                            continue
                        dst = state[name]
                        dst.copy_(v.view(dst.shape))
                    if lasts:
                        mods[net].last_v.copy_(torch.stack(lasts))

    # ---- one step
    def _normalize(self, x_u8):
        x = x_u8.to(self.device, non_blocking=True).float().div_(255.0)[:, None]
        return (x.expand(-1, self.c.in_chans, -1, -1) - self.mean) / self.std

    def _forward_teacher(self, img):
        with torch.no_grad(), torch.autocast(self.device, dtype=torch.bfloat16,
                                             enabled=self.bf16):
            return self.t_head(self.t_enc(img)).float()

    def _forward_loss(self, img, img_p, abn, protos):
        c = self.c
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
            tok = self.enc(img_p)
            s = self.head(tok)
            pred = self.dec(tok, abn)
        l_stru, l_cate = paper_losses(s.float(), protos, abn, c.tau_student, c.tau_similarity)
        l_recon = recon_loss(pred, patchify(img, c.patch_size), abn, c.w_abnormal)
        loss = c.w_stru * l_stru + c.w_cate * l_cate + c.w_recon * l_recon
        return loss, torch.stack([l_stru, l_cate, l_recon])

    def losses(self, x_u8, xp_u8, abn_u8):
        """The step up to the loss (prototypes updated): (loss tensor, [l_stru, l_cate,
        l_recon])."""
        c = self.c
        img, img_p = self._normalize(x_u8), self._normalize(xp_u8)
        abn = abn_u8.to(self.device, non_blocking=True).bool()
        t_logits = self.forward_teacher(img)
        q = sinkhorn(t_logits.reshape(-1, c.num_prototypes), self.sched["teacher_temp"],
                     c.sinkhorn_iters).reshape(t_logits.shape)
        with torch.no_grad():
            if self.first:
                self.protos.copy_(q.double().mean(0).float())
                self.first = False
            else:
                m = c.proto_momentum
                self.protos.copy_((m * self.protos.double()
                                   + (1 - m) * q.double().mean(0)).float())
        return self.forward_loss(img, img_p, abn, self.protos)

    @torch.no_grad()
    def clip_(self):
        """afire's per-tensor clipping: g *= clip / (||g|| + 1e-6) where that is < 1, each
        position's last layer a tensor of its own. Returns the global norm before clipping."""
        grads = []
        for p in self.params:
            if p.grad is not None:
                grads += list(p.grad.unbind(0)) if p is self.head.last_v else [p.grad]
        norms = torch.stack(torch._foreach_norm(grads))
        coef = (self.c.clip_grad / (norms + 1e-6)).clamp_(max=1.0)
        torch._foreach_mul_(grads, list(coef.unbind()))
        return norms.double().square().sum().sqrt()

    def step(self, x_u8, xp_u8, abn_u8):
        loss, _ = self.losses(x_u8, xp_u8, abn_u8)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.clip_()
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.teacher, self.student, 1.0 - self.sched["ema"])
        return loss.item()  # one host sync, as afire's step returns its losses


def torch_name(afire_name):
    """The module attribute an afire table name maps to (weight_v rows stack into last_v)."""
    return "last_v" if afire_name.endswith("weight_v") else afire_name


def schedule_of(stats):
    """{lr, wd, ema, teacher_temp} from afire's step statistics."""
    return {"lr": stats["lr"], "wd": stats["weight_decay"], "ema": stats["ema_momentum"],
            "teacher_temp": stats["teacher_temp"]}


# ---------------------------------------------------------------------------- the check

def check_against_afire(preset="test", batch=4, step=20, seed=0, rtol=2e-4, **overrides):
    """afire's CPU step vs this reference from the same weights, on the CPU, fp32: the first
    step's l_stru, l_cate, l_recon, total loss and pre-clip gradient norm within rtol
    (relative, with 1e-6 absolute), and the clipped gradients of every network with cosine
    similarity > 0.9999. Returns a dict of what was compared; raises AssertionError on a
    mismatch."""
    from afire import AFiRe, Config
    from afire.model import synthetic_lesions

    cfg = Config.preset_config(preset, batch_size=batch, epochs=100, seed=seed, **overrides)
    m = AFiRe(cfg, device="cpu", steps_per_epoch=1)
    m.step = step
    x = chest_like(batch, cfg.img_size, seed)
    xp, _, abn = synthetic_lesions(cfg, x, step=step)
    ref = m._t.gradients(x)  # no update: the losses and gradients of step `step`
    torch.manual_seed(0)
    t = TorchAFiRe.from_afire(m, "cpu", schedule=schedule_of(ref))
    loss, terms = t.losses(*(torch.from_numpy(a) for a in (x, xp, abn)))
    t.opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = t.clip_()
    terms = terms.detach()
    got = {"loss": float(loss.detach()), "l_stru": float(terms[0]), "l_cate": float(terms[1]),
           "l_recon": float(terms[2]), "grad_norm": float(norm)}
    out = {"preset": preset, "batch": batch, "step": step, "overrides": overrides, "afire": {},
           "torch": got, "grad_cosine": {}}
    for k, v in got.items():
        out["afire"][k] = ref[k]
        assert math.isclose(v, ref[k], rel_tol=rtol, abs_tol=1e-6), (k, v, ref[k])
    grads = m._t.buffers()
    for net, mod in t.nets.items():
        a = np.asarray(grads[f"grad.{net}"], np.float64)
        b = np.zeros_like(a)
        params = dict(mod.named_parameters())
        lasts = 0
        for e in m._t.param_table(net):
            if not e["trainable"]:
                continue
            n = int(np.prod(e["shape"]))
            name = torch_name(e["name"])
            g = params[name].grad
            if name == "last_v":
                g = g[lasts]
                lasts += 1
            b[e["offset"]:e["offset"] + n] = g.detach().double().reshape(-1).numpy()
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        out["grad_cosine"][net] = cos
        assert cos > 0.9999, (net, cos)
    return out
