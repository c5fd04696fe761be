"""Models for exmask: a ViT image tower, a Transformer text tower, SSF and prompt adapters, and the
two-tower classifier whose head grows by the new classes of each phase.

The image tower keeps the state-dict layout of timm's VisionTransformer (`cls_token`, `pos_embed`,
`patch_embed.proj`, `blocks.i.attn.qkv`, ...), so timm checkpoints load as a plain copy. The text
tower is one Block with a pre-norm flag: pre-norm for CLIP-like towers (the default), post-norm for
BERT-family checkpoints (BERT, MiniLM), loaded by `load_bert`. Both towers of a CLIP or SigLIP model
load by `load_clip_hf` (Hugging Face) or `load_clip_openai` (OpenAI / open_clip), with the few config
fields those models need (a causal text tower, end-of-text or last-position pooling, quick-GELU, ...).

Every forward works on token subsets: the image tower takes patches plus their patch indices, the
text tower takes token ids plus their positions, so masked exemplars replay at their original
positions. With `aux=True` a forward also returns, per tower, the pooling query's attention row over
the tokens (one row, never the N x N matrix) and the token features in the shared embedding space.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ViTConfig:
    image_size: int = 32
    patch_size: int = 4
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    pool: str = "cls"              # "cls" ([CLS] token) or "map" (SigLIP attention-pool probe)
    embed_dim: int = 64            # shared embedding size after `proj`; 0 = no projection
    ln_eps: float = 1e-6
    norm_pre: bool = False         # a LayerNorm on the embedded tokens before the blocks (CLIP's ln_pre)
    act: str = "gelu"              # the MLPs' activation: "gelu", "gelu_tanh" (SigLIP), "quick_gelu" (OpenAI CLIP)
    mean: tuple = (0.5, 0.5, 0.5)  # pixel normalisation, in 0..1 units
    std: tuple = (0.5, 0.5, 0.5)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid ** 2


@dataclass
class TextConfig:
    vocab_size: int = 700
    context: int = 24
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    pre_norm: bool = True          # False: BERT layout (post-norm, embedding LayerNorm, token types)
    embed_dim: int = 64            # 0 = no projection
    pad_id: int = 0
    ln_eps: float = 1e-6
    act: str = "gelu"              # as ViTConfig.act
    causal: bool = False           # a token sees only the tokens at its position or before (CLIP)
    pool: str = "cls"              # which token's output is the caption's embedding: "cls" position 0 (BOS /
                                   # [CLS]); "eos" the last token (CLIP's end of text); "last" the context's last
                                   # position, every position after the caption holding fill_id (SigLIP);
                                   # "mean" the mean over the caption's tokens (sentence-transformers' models)
    fill_id: int = 0               # pool "last": the token that fills the context after the caption
    proj_bias: bool = False        # the projection has a bias (SigLIP's text head)


@dataclass
class ModelConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)
    text: TextConfig = field(default_factory=TextConfig)
    adapter: str = "ssf"           # "ssf", "prompt" (deep gated prompts) or "none" (head only)
    prompt_len: int = 4
    modalities: str = "image,text"  # "image", "text" or "image,text"
    shared_space: bool = True      # both towers trained together into one embedding space (the default
                                   # towers are); loaders of unrelated checkpoints set it False, and the
                                   # text mask's cross-modal context term then never runs

    @staticmethod
    def from_dict(d: dict) -> "ModelConfig":
        vit = dict(d["vit"], mean=tuple(d["vit"]["mean"]), std=tuple(d["vit"]["std"]))
        # a file written before shared_space existed claims no shared space
        rest = {"shared_space": False} | {k: v for k, v in d.items() if k not in ("vit", "text")}
        return ModelConfig(ViTConfig(**vit), TextConfig(**d["text"]), **rest)


# ----------------------------------------------------------------------------- pure helpers

def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, N, C*p*p), each patch flattened in Conv2d weight order (C, p, p)."""
    B, C, S, _ = images.shape
    g = S // p
    x = images.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5)  # (B, g, g, C, p, p)
    return x.reshape(B, g * g, C * p * p)


def unpatchify(patches: torch.Tensor, p: int, C: int = 3) -> torch.Tensor:
    """(B, N, C*p*p) -> (B, C, S, S); the inverse of patchify."""
    B, N, _ = patches.shape
    g = math.isqrt(N)
    x = patches.reshape(B, g, g, C, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, g, p, g, p)
    return x.reshape(B, C, g * p, g * p)


def all_patches(x: torch.Tensor) -> torch.Tensor:
    """Patch indices 0..N-1 for every sample of a (B, N, ...) batch: (B, N), on x's device."""
    return torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), idx (B, K) -> (B, K, D). The gather expands, never repeats."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """The MLP activation `name`: exact GELU, its tanh approximation, or OpenAI CLIP's x * sigmoid(1.702 x)."""
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")


# ----------------------------------------------------------------------------- adapters

class SSF(nn.Module):
    """Scale and shift per channel (Lian et al. 2022); identity at init, folded away by merge_ssf."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused op, in x's dtype: fp32 parameters would promote bf16 activations under autocast
        return torch.addcmul(self.shift.to(x.dtype), x, self.scale.to(x.dtype))


def ssf(dim: int, on: bool) -> nn.Module:
    return SSF(dim) if on else nn.Identity()


def fold_ssf(weight: torch.Tensor, bias: torch.Tensor | None, ssf_mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """An op's (weight (out, ...), bias (out,) or None) with the SSF after it folded in:
    s * (W x + b) + t = (s W) x + (s b + t). An nn.Identity in place of the SSF folds nothing.
    Differentiable: with_ssf folds on the fly in the forward; merge_ssf folds for good."""
    if not isinstance(ssf_mod, SSF):
        return weight, bias if bias is not None else weight.new_zeros(weight.shape[0])
    s, t = ssf_mod.scale, ssf_mod.shift
    b = bias if bias is not None else torch.zeros_like(s)
    return weight * s.view(-1, *[1] * (weight.dim() - 1)), b * s + t


# Below this |scale| LinearSSF's backward divides by +-SSF_MIN_SCALE instead (see LinearSSF).
SSF_MIN_SCALE = 1e-3


def guarded_inverse(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale, with |scale| held at SSF_MIN_SCALE or more (the sign kept; +SSF_MIN_SCALE at +0)."""
    return scale.reciprocal().clamp(-1 / SSF_MIN_SCALE, 1 / SSF_MIN_SCALE)   # two kernels, not four


class LinearSSF(torch.autograd.Function):
    """s * (x W^T + b) + t for a frozen W (out, in), b (out,) or None, trained SSF scale s and shift
    t (out,): one matmul with the SSF folded into the weight, W' = s[:, None] W, b' = s b + t
    (weight-sized), and no weight-gradient matmul in the backward. It saves y, the output (which the
    next op mostly keeps anyway), and W'. Backward, with out = x W^T + b = (y - t) / s:
      dx = dy W'          (the frozen Linear's input gradient; s is inside W')
      dt = sum dy,  ds = sum dy * (y - t) / s      (sums over every leading dim, fp32)
    The two sums are one fused reduction that reads dy and y once: batch norm's backward with mean t
    and inverse std 1/s, whose weight and bias gradients are exactly ds and dt (CPU and CUDA).
    (y - t) / s carries y's rounding (fp32, or bf16 under autocast) times |y| / |s * out|: exact
    enough while |s| is not tiny against |t| / |out|. Where |s| < SSF_MIN_SCALE (and at 0, where 1/s
    is inf) the division uses +-SSF_MIN_SCALE instead: that channel's ds is damped by |s| /
    SSF_MIN_SCALE (0 at s = 0), its sign and dt stay right, and Adam's per-parameter normalisation
    mostly hides the damping. SSF scales start at 1. inv_scale is guarded_inverse(scale), passed in
    because dynamo (torch 2.14, dynamic shapes) fails to lift a float global into a second traced
    call of the same Function. Under autocast the matmul runs in the autocast dtype, as F.linear
    would, and the fp32 SSF parameters never promote the activations; their gradients come back in
    fp32. Compiles without a graph break (test_compiled_masked_step_equals_eager)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                scale: torch.Tensor, shift: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        w = torch.mul(weight, scale[:, None], out=weight.new_empty(weight.shape, dtype=dtype))  # (out, in)
        b = shift if bias is None else torch.addcmul(shift, bias, scale)        # (out,)
        y = F.linear(x.to(dtype), w, b.to(dtype))                               # (..., out)
        acc = torch.promote_types(dtype, torch.float32)
        ctx.save_for_backward(y, w, inv_scale.to(acc), shift.to(acc))
        ctx.dtypes = x.dtype, scale.dtype, shift.dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        y, w, inv, t = ctx.saved_tensors                  # inv = 1/s guarded, both in fp32 (or fp64)
        x_dtype, s_dtype, t_dtype = ctx.dtypes
        dx = dy.matmul(w).to(x_dtype) if ctx.needs_input_grad[0] else None
        ds = dt = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            C = y.shape[-1]
            if y.numel() == 0:                            # batch norm's CPU kernel divides by the rows
                ds, dt = torch.zeros_like(inv), torch.zeros_like(t)
            else:   # weight=inv: only its dtype matters (it scales the input gradient, not asked for);
                    # without one, CUDA returns empty parameter gradients
                _, ds, dt = torch.ops.aten.native_batch_norm_backward(
                    dy.reshape(-1, C).contiguous(), y.reshape(-1, C), inv, None, None, t, inv,
                    True, 0.0, [False, True, True])
            ds, dt = ds.to(s_dtype), dt.to(t_dtype)
        return dx, None, None, ds, dt, None


# How a Linear (or the patch embedding) trains the SSF after it; inference always folds.
#   "function" (default): LinearSSF, one matmul forward, dx backward (the matmuls of timm's
#       LayerNorm-tuning step, test_ssf_train_step_adds_no_matmul) plus one fused reduction per
#       Linear that reads dy and y.
#   "fold": autograd through F.linear(x, s W, s b + t), which computes dL/dW' = dy^T x to reach s:
#       a third matmul per Linear (+50 % of the step's matmul FLOPs; x saved for it), but no
#       activation-sized elementwise pass.
#   "addcmul": F.linear, then s * out + t in the activation dtype: activation-sized passes forward
#       (and out saved) and backward (dy * s, dy * out, two sums).
# Measured before "function" existed (bench.py model_speed, ViT-B/16, batch 256, bf16, NVIDIA H200):
# "fold" 2,804 img/s and "addcmul" 2,279, against 3,427 for timm's LayerNorm-tuning step; the rows
# "step ours SSF" (function), "... fold" and "... addcmul" of model_speed compare all three.
# Under torch.compile "function" trains as SSF_COMPILED. With COMPILE_OPTIONS both "function" and
# "addcmul" compile for CUDA (torch 2.11; without them inductor failed on both), and "function" is
# the faster compiled step (bench.py model_speed --compile, ViT-B/16, batch 256, NVIDIA H200: 3,920
# img/s against 3,320; on the CPU, ViT-Ti/16 at 112 px: 135 against 124).
SSF_TRAIN = "function"
SSF_COMPILED = "function"


def with_ssf(op: nn.Module, s: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """s(op(x)), with the SSF s (or an nn.Identity) folded into op's weights on the fly. op is a
    LayerNorm, a Linear, the patch embedding's Conv2d on flattened patches (B, K, C*p*p) (a Linear
    with the weight flattened), or anything else (no fold). LayerNorm: into its affine, weight * s,
    bias * s + t (vector-sized, always). Linear: W * s[:, None], b * s + t (weight-sized) when the
    SSF gets no gradient; while it trains, as SSF_TRAIN says ("function" needs the Linear frozen,
    else it folds, which trains W too)."""
    if isinstance(op, nn.LayerNorm):
        return F.layer_norm(x, op.normalized_shape, *fold_ssf(op.weight, op.bias, s), op.eps)
    if not isinstance(op, (nn.Linear, nn.Conv2d)):
        return s(op(x))
    w = op.weight.flatten(1)                                                  # (out, in)
    if not isinstance(s, SSF):
        return F.linear(x, w, op.bias)
    trains = torch.is_grad_enabled() and (s.scale.requires_grad or s.shift.requires_grad)
    frozen = not (op.weight.requires_grad or (op.bias is not None and op.bias.requires_grad))
    mode = SSF_COMPILED if SSF_TRAIN == "function" and torch.compiler.is_compiling() else SSF_TRAIN
    if trains and mode == "function" and frozen:
        return LinearSSF.apply(x, w, op.bias, s.scale, s.shift, guarded_inverse(s.scale.detach()))
    if trains and mode == "addcmul":
        return s(F.linear(x, w, op.bias))
    return F.linear(x, *fold_ssf(w, op.bias, s))


@torch.no_grad()
def merge_ssf(model: nn.Module) -> nn.Module:
    """Fold every `<op>_ssf` into its sibling `<op>` (Linear, Conv2d or LayerNorm), in place."""
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if not (name.endswith("_ssf") and isinstance(child, SSF)):
                continue
            op = getattr(mod, name[:-4])
            w, b = fold_ssf(op.weight, op.bias, child)
            op.weight.copy_(w)
            if op.bias is None:
                op.bias = nn.Parameter(b, requires_grad=False)
            else:
                op.bias.copy_(b)
            setattr(mod, name, nn.Identity())
    return model


# ----------------------------------------------------------------------------- transformer parts

class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, use_ssf: bool, prompt_len: int = 0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qkv_ssf = ssf(3 * dim, use_ssf)
        self.proj = nn.Linear(dim, dim)
        self.proj_ssf = ssf(dim, use_ssf)
        if prompt_len:  # gated prefix prompts: tanh(0) = 0, so the output is unchanged at init
            self.prompt = nn.Parameter(torch.randn(prompt_len, dim) * 0.02)
            self.prompt_gate = nn.Parameter(torch.zeros(heads))
        else:
            self.prompt = None

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, N, D = t.shape
        return t.view(B, N, self.heads, D // self.heads).transpose(1, 2)  # (B, H, N, Dh)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, row: bool | torch.Tensor = False):
        """x (B, N, D); keep None, a (B, N) bool key mask, or a (B, N, N) bool mask of the keys (last
        axis) each query may see (causal text). row also returns the pooling query's attention over
        the N keys, mean over heads, (B, N): row=True for query 0, or (B,) each sample's query."""
        B, N, D = x.shape
        H = self.heads
        # split on the 3 axis, then (B, H, N, Dh) views: the backward stacks dq, dk, dv straight into
        # qkv's (B, N, 3, H, Dh) layout, one copy (permute(2, 0, 3, 1, 4).unbind(0) takes a second)
        qkv = with_ssf(self.qkv, self.qkv_ssf, x).view(B, N, 3, H, D // H)  # (B, N, 3, H, Dh)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))                # (B, H, N, Dh) each
        mask = None if keep is None else keep[:, None, None, :] if keep.dim() == 2 else keep[:, None]  # (B, 1, 1|N, N)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)          # (B, H, N, Dh)
        if self.prompt is not None:
            pk, pv = self.qkv(self.prompt)[:, D:].view(-1, 2, D).unbind(1)   # (P, D) each
            pk = self._heads(pk.expand(B, -1, -1))
            pv = self._heads(pv.expand(B, -1, -1))
            y = y + torch.tanh(self.prompt_gate).view(1, -1, 1, 1) * F.scaled_dot_product_attention(q, pk, pv)
        y = with_ssf(self.proj, self.proj_ssf, y.transpose(1, 2).reshape(B, N, D))
        if row is False:
            return y, None
        i = torch.zeros(B, 1, 1, 1, dtype=torch.long, device=x.device) if row is True else row.view(B, 1, 1, 1)
        qi = q.gather(2, i.expand(-1, H, -1, D // H))                        # (B, H, 1, Dh)
        a = (qi @ k.transpose(-1, -2)) / math.sqrt(D // self.heads)          # (B, H, 1, N)
        if mask is not None:
            a = a.masked_fill(~(mask if mask.shape[2] == 1 else mask.gather(2, i.expand(-1, -1, -1, N))), float("-inf"))
        return y, a.softmax(-1).mean(1)[:, 0]                                 # (B, N)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, use_ssf: bool, act: str = "gelu"):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {act!r}")
        self.act = act
        self.fc1 = nn.Linear(dim, hidden)
        self.fc1_ssf = ssf(hidden, use_ssf)
        self.fc2 = nn.Linear(hidden, dim)
        self.fc2_ssf = ssf(dim, use_ssf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return with_ssf(self.fc2, self.fc2_ssf, activation(with_ssf(self.fc1, self.fc1_ssf, x), self.act))


class Block(nn.Module):
    """One transformer block; pre_norm=False gives BERT's post-norm block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float, pre_norm: bool = True,
                 use_ssf: bool = False, prompt_len: int = 0, act: str = "gelu"):
        super().__init__()
        self.pre_norm = pre_norm
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm1_ssf = ssf(dim, use_ssf)
        self.attn = Attention(dim, heads, use_ssf, prompt_len)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.norm2_ssf = ssf(dim, use_ssf)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), use_ssf, act)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, row: bool | torch.Tensor = False):
        if self.pre_norm:
            y, a = self.attn(with_ssf(self.norm1, self.norm1_ssf, x), keep, row)
            x = x + y
            x = x + self.mlp(with_ssf(self.norm2, self.norm2_ssf, x))
        else:
            y, a = self.attn(x, keep, row)
            x = with_ssf(self.norm1, self.norm1_ssf, x + y)
            x = with_ssf(self.norm2, self.norm2_ssf, x + self.mlp(x))
        return x, a


class AttentionPool(nn.Module):
    """SigLIP's attention-pool probe (timm `AttentionPoolLatent` layout, one latent)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float, act: str = "gelu"):
        super().__init__()
        self.heads = heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), False, act)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None):
        """x (B, N, D), keep None or a (B, N) bool key mask -> pooled (B, D) and the probe's
        attention row (B, N), mean over heads."""
        B, N, D = x.shape
        H = self.heads
        q = self.q(self.latent.expand(B, -1, -1)).view(B, 1, H, D // H).transpose(1, 2)  # (B, H, 1, Dh)
        k, v = self.kv(x).view(B, N, 2, H, D // H).permute(2, 0, 3, 1, 4)             # (B, H, N, Dh)
        mask = None if keep is None else keep[:, None, None, :]                        # (B, 1, 1, N)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, 1, D)
        y = self.proj(y)
        y = y + self.mlp(self.norm(y))
        a = (q @ k.transpose(-1, -2)) / math.sqrt(D // H)                              # (B, H, 1, N)
        if mask is not None:
            a = a.masked_fill(~mask, float("-inf"))
        return y[:, 0], a.softmax(-1).mean(1)[:, 0]                                    # (B, N)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, D): each token through the pool as if the probe attended to it alone,
        the per-token analogue of the pooled output, in its space (what a CLS tower's projection of
        every token is): the token features that the text mask's context term compares."""
        D = x.shape[-1]
        y = self.proj(self.kv(x)[..., D:])                                         # (B, N, D)
        return y + self.mlp(self.norm(y))


# ----------------------------------------------------------------------------- towers

class ViT(nn.Module):
    """Image tower; parameter names follow timm's VisionTransformer."""

    def __init__(self, cfg: ViTConfig, adapter: str = "none", prompt_len: int = 0):
        super().__init__()
        self.cfg = cfg
        D, use_ssf = cfg.dim, adapter == "ssf"
        P = prompt_len if adapter == "prompt" else 0
        self.prefix = 1 if cfg.pool == "cls" else 0
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, D, cfg.patch_size, cfg.patch_size)
        self.patch_embed.proj_ssf = ssf(D, use_ssf)
        if self.prefix:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.n_patches + self.prefix, D) * 0.02)
        if cfg.norm_pre:
            self.norm_pre = nn.LayerNorm(D, eps=cfg.ln_eps)
            self.norm_pre_ssf = ssf(D, use_ssf)
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio, cfg.ln_eps, True, use_ssf, P, cfg.act)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.norm_ssf = ssf(D, use_ssf)
        if cfg.pool == "map":
            self.attn_pool = AttentionPool(D, cfg.heads, cfg.mlp_ratio, cfg.ln_eps, cfg.act)
        self.proj = nn.Linear(D, cfg.embed_dim, bias=False) if cfg.embed_dim else nn.Identity()
        p2 = cfg.patch_size ** 2
        self.register_buffer("pix_mean", torch.tensor(cfg.mean).repeat_interleave(p2) * 255, persistent=False)
        self.register_buffer("pix_std", torch.tensor(cfg.std).repeat_interleave(p2) * 255, persistent=False)
        self.register_buffer("chan_mean", torch.tensor(cfg.mean).view(3, 1, 1) * 255, persistent=False)
        self.register_buffer("chan_std", torch.tensor(cfg.std).view(3, 1, 1) * 255, persistent=False)

    def forward(self, pixels: torch.Tensor, idx: torch.Tensor, aux: bool = False, keep: torch.Tensor | None = None):
        """pixels (B, K, 3*p*p) in 0..255 (any float or uint8), idx (B, K) patch indices, keep None or
        (B, K) bool: which of the K are real (rows that keep fewer patches are padded; the padding is
        masked out of attention and pooling). Returns emb (B, E) and, with aux, (attention row over
        the K patches (B, K), tokens (B, K, E))."""
        x = (pixels.to(self.pix_mean.dtype) - self.pix_mean) / self.pix_std
        x = with_ssf(self.patch_embed.proj, self.patch_embed.proj_ssf, x)         # (B, K, D)
        x = x + self.pos_embed[0, self.prefix:][idx]                              # keeps positions
        return self.encode(x, aux, keep)

    def forward_images(self, images: torch.Tensor, aux: bool = False):
        """images (B, 3, S, S) in 0..255 -> the same outputs with every patch kept, through the
        Conv2d (no patchify, no gather: the exported graph). Tests check it equals forward()."""
        x = (images - self.chan_mean) / self.chan_std
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)                   # (B, N, D)
        x = self.patch_embed.proj_ssf(x) + self.pos_embed[:, self.prefix:]
        return self.encode(x, aux)

    def encode(self, x: torch.Tensor, aux: bool = False, keep: torch.Tensor | None = None):
        """Embedded patches (B, K, D), positions added, keep None or (B, K) bool real patches -> emb (B, E) [, aux]."""
        if self.prefix:
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], 1)                                            # (B, 1+K, D)
            if keep is not None:
                keep = F.pad(keep, (1, 0), value=True)                            # (B, 1+K)
        if self.cfg.norm_pre:
            x = with_ssf(self.norm_pre, self.norm_pre_ssf, x)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            x, a = blk(x, keep, row=aux and i == last and self.prefix == 1)
        x = with_ssf(self.norm, self.norm_ssf, x)
        if self.prefix:
            pooled = x[:, 0]
        else:
            pooled, a = self.attn_pool(x, keep)
        emb = self.proj(pooled)
        if not aux:
            return emb
        tokens = x[:, 1:] if self.prefix else self.attn_pool.tokens(x)             # (B, K, D)
        return emb, (a[:, self.prefix:], self.proj(tokens))


class TextTransformer(nn.Module):
    """Text tower. Pools one token, cfg.pool: position 0 (BOS / [CLS], always kept), the last token
    (CLIP's end of text, which data.encode_texts keeps last), or SigLIP's last context position; or
    ("mean") the mean of every kept token's output, as sentence-transformers pools its BERT models."""

    def __init__(self, cfg: TextConfig, adapter: str = "none", prompt_len: int = 0):
        super().__init__()
        if cfg.pool not in ("cls", "eos", "last", "mean"):
            raise ValueError(f"text pool must be cls, eos, last or mean, got {cfg.pool!r}")
        self.cfg = cfg
        D, use_ssf = cfg.dim, adapter == "ssf"
        P = prompt_len if adapter == "prompt" else 0
        self.tok_embed = nn.Embedding(cfg.vocab_size, D)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.context, D) * 0.01)
        if not cfg.pre_norm:  # BERT: token-type embedding and a LayerNorm on the embeddings
            self.type_embed = nn.Parameter(torch.zeros(1, 1, D))
            self.emb_norm = nn.LayerNorm(D, eps=cfg.ln_eps)
            self.emb_norm_ssf = ssf(D, use_ssf)
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio, cfg.ln_eps, cfg.pre_norm, use_ssf, P, cfg.act)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps) if cfg.pre_norm else nn.Identity()
        self.norm_ssf = ssf(D, use_ssf and cfg.pre_norm)
        self.proj = nn.Linear(D, cfg.embed_dim, bias=cfg.proj_bias) if cfg.embed_dim else nn.Identity()

    def fill(self, x: torch.Tensor, keep: torch.Tensor, pos: torch.Tensor):
        """SigLIP reads every caption at the full context: after the caption's last token, fill_id
        tokens to the end, attended like any other, and pools the last. Appends those tokens at the
        positions after the last kept one (the rest masked): (B, L, D) -> (B, L + context, D)."""
        B, C = x.shape[0], self.cfg.context
        p = torch.arange(C, device=x.device)
        last = torch.where(keep, pos, -1).amax(1, keepdim=True)                      # (B, 1)
        fx = (self.tok_embed.weight[self.cfg.fill_id] + self.pos_embed[0]).expand(B, -1, -1)   # (B, C, D)
        return torch.cat([x, fx], 1), torch.cat([keep, p > last], 1), torch.cat([pos, p.expand(B, -1)], 1)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor | None = None, aux: bool = False):
        """ids (B, L) token ids, pad_id where empty; pos (B, L) their positions (default 0..L-1).
        Returns emb (B, E) and, with aux, (attention row of the pooled token over the L tokens (B, L),
        position 0's for pool "mean", tokens (B, L, E))."""
        c = self.cfg
        B, L = ids.shape
        keep = ids != c.pad_id                                                    # (B, L)
        if pos is None:
            pos = torch.arange(L, device=ids.device).expand_as(ids)
        x = self.tok_embed(ids) + self.pos_embed[0][pos]                          # (B, L, D)
        if c.pool == "last":
            x, keep, pos = self.fill(x, keep, pos)                                # (B, L + context, D)
        if not c.pre_norm:
            x = with_ssf(self.emb_norm, self.emb_norm_ssf, x + self.type_embed)
        mask = keep
        if c.causal:   # by position, not order (replayed tokens may come in any order); each token sees itself
            n = x.shape[1]
            mask = (keep[:, None, :] & (pos[:, None, :] <= pos[:, :, None])) | torch.eye(n, dtype=torch.bool, device=x.device)  # (B, N, N): query, key
        # the pooled token: 0, or the last kept one in the sequence (the end of text; SigLIP's last fill token)
        at = None if c.pool in ("cls", "mean") else (keep * torch.arange(1, x.shape[1] + 1, device=x.device)).argmax(1)   # (B,)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            x, a = blk(x, mask, row=aux and i == last and (True if at is None else at))
        x = with_ssf(self.norm, self.norm_ssf, x)
        if c.pool == "mean":   # the padding left out: (B, D)
            w = keep.to(x.dtype)[..., None]
            pooled = (x * w).sum(1) / w.sum(1).clamp(min=1)
        else:
            pooled = x[:, 0] if at is None else x.gather(1, at.view(B, 1, 1).expand(-1, -1, x.shape[-1]))[:, 0]
        emb = self.proj(pooled)
        if not aux:
            return emb
        return emb, (a[:, :L], self.proj(x[:, :L]))


# ----------------------------------------------------------------------------- classifier

def empty_linear(i: int, o: int) -> nn.Linear:
    """nn.Linear left uninitialised (the caller fills it); quiet for o == 0, a head with no classes yet."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return nn.Linear(i, o)


class TwoTower(nn.Module):
    """Late fusion: the pooled, L2-normalised embeddings of both towers, joined, then a linear head
    over every class seen so far. The loss lives in the training code, so forward is inference."""

    def __init__(self, cfg: ModelConfig, n_classes: int = 0):
        super().__init__()
        self.cfg = cfg
        self.use_image = "image" in cfg.modalities
        self.use_text = "text" in cfg.modalities
        if not (self.use_image or self.use_text):
            raise ValueError(f"modalities must name image and/or text, got {cfg.modalities!r}")
        self.image = ViT(cfg.vit, cfg.adapter, cfg.prompt_len)
        self.text = TextTransformer(cfg.text, cfg.adapter, cfg.prompt_len)
        e_img = cfg.vit.embed_dim or cfg.vit.dim
        e_txt = cfg.text.embed_dim or cfg.text.dim
        if cfg.shared_space and self.use_image and self.use_text and e_img != e_txt:
            raise ValueError(f"towers in one embedding space have one width, got image {e_img} and text {e_txt}; "
                             "unrelated towers need shared_space=False")
        self.feat_dim = e_img * self.use_image + e_txt * self.use_text
        self.head = empty_linear(self.feat_dim, 0)
        if n_classes:
            self.grow(n_classes)

    @property
    def n_classes(self) -> int:
        return self.head.out_features

    def grow(self, n_new: int) -> None:
        """Add n_new classes to the head; the old rows keep their weights."""
        old = self.head
        new = empty_linear(self.feat_dim, old.out_features + n_new).to(old.weight.device)
        with torch.no_grad():
            nn.init.normal_(new.weight, std=0.01)
            new.bias.zero_()
            new.weight[:old.out_features] = old.weight
            new.bias[:old.out_features] = old.bias
        self.head = new

    def features(self, pixels, patch_idx, ids, pos=None, aux: bool = False, patch_keep=None):
        """Fused features (B, F) from kept tokens (patch_keep as forward_tokens takes it); with aux also
        (image_aux, text_aux), each (pooling attention row, token features) or None for an unused tower."""
        outs = [self.image(pixels, patch_idx, aux=aux, keep=patch_keep) if self.use_image else None,
                self.text(ids, pos, aux=aux) if self.use_text else None]
        if not aux:
            return self.fuse(*outs)
        f = self.fuse(*[o[0] if o is not None else None for o in outs])
        return f, tuple(o[1] if o is not None else None for o in outs)

    @staticmethod
    def fuse(img_emb: torch.Tensor | None, txt_emb: torch.Tensor | None) -> torch.Tensor:
        """L2-normalise each tower's pooled embedding and join them: (B, F)."""
        return torch.cat([F.normalize(e, dim=-1) for e in (img_emb, txt_emb) if e is not None], -1)

    def head_input(self, fused: torch.Tensor) -> torch.Tensor:
        """Fused features (B, F) -> what the head reads: scaled to a norm of sqrt(F) a tower."""
        return fused * math.sqrt(self.feat_dim)

    def classify(self, img_emb: torch.Tensor | None, txt_emb: torch.Tensor | None) -> torch.Tensor:
        """Pooled embeddings -> logits (B, C)."""
        return self.head(self.head_input(self.fuse(img_emb, txt_emb)))

    def forward_tokens(self, pixels, patch_idx, ids, pos=None, patch_keep=None):
        """Logits (B, C) from kept image patches (B, K, 3*p*p) at patch_idx (B, K) and kept text
        tokens ids (B, L) at positions pos (B, L); patch_keep (B, K) bool marks the real patches
        where rows keep different numbers of them (None: all real)."""
        return self.head(self.head_input(self.features(pixels, patch_idx, ids, pos, patch_keep=patch_keep)))

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) in 0..255, ids (B, L) -> logits (B, C). The exported graph."""
        return self.classify(self.image.forward_images(images) if self.use_image else None,
                             self.text(ids) if self.use_text else None)

    # --- parameter groups
    def freeze_backbone(self) -> None:
        """Train only the adapters and the head."""
        unused = tuple(t for t, use in (("image.", self.use_image), ("text.", self.use_text)) if not use)
        for n, p in self.named_parameters():   # an unused tower's adapters never train
            p.requires_grad = (n.startswith("head.") or "_ssf." in n or ".prompt" in n) and not n.startswith(unused or "\0")

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def backbone_state(self) -> dict:
        """The frozen towers' weights (no adapters, no head): what pretraining produces."""
        return {k: v for k, v in self.state_dict().items()
                if not (k.startswith("head.") or "_ssf." in k or ".prompt" in k)}


# Inductor's options under --compile. Its coalescing analysis of tilings failed an internal
# assertion (get_pw_red_splits) on the SSF step's fused reductions with dynamic shapes (torch 2.11,
# CUDA); inductor's own note says that analysis does not apply to dynamic shapes yet.
COMPILE_OPTIONS = {"triton.coalesce_tiling_analysis": False}


def compiled(fn, dynamic: bool = True):
    """torch.compile(fn) with COMPILE_OPTIONS and dynamic shapes (kept patches and caption lengths
    vary from batch to batch); dynamic=False compiles for the shapes of the first call (bench.py)."""
    return torch.compile(fn, dynamic=dynamic, options=dict(COMPILE_OPTIONS) or None)


def compile_towers(model: TwoTower) -> None:
    """Compile each tower's forward in place (compiled). The towers, not forward_tokens: the head
    grows every phase, and each new head would recompile the whole model (dynamo gives up after 8
    and runs eager). The state dict keeps its names."""
    for tower in (model.image, model.text):
        tower.forward = compiled(tower.forward)


# SDPA's kernels for the phase loop on a GPU (train.run_method, under loop_attention): flash and
# memory-efficient attention, not cuDNN's. cuDNN's attention builds an execution plan for every new
# shape, and the loop's shapes change from step to step (kept patches, caption lengths, replayed
# rows): on an NVIDIA H200 (torch 2.11, ViT-B/16, a step of 32 new rows whole, 32 masked and 31
# replayed) a step of new shapes took 217 ms against 88 ms for shapes seen before; with these kernels
# 112 ms. The phase loop (bench.py phase_loop) took 50.4 s with them against 70.4 s. None: PyTorch's
# own choice (cuDNN's first on Hopper GPUs). The CPU has one kernel either way.
LOOP_SDPA = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def loop_attention(device: str):
    """A context in which SDPA on a GPU uses only LOOP_SDPA's kernels; on the CPU, or with LOOP_SDPA
    None, nothing changes."""
    if not device.startswith("cuda") or LOOP_SDPA is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([getattr(SDPBackend, k) for k in LOOP_SDPA])


def autocast(device: str):
    """bf16 autocast on a GPU; nothing on the CPU (fp32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)


# ----------------------------------------------------------------------------- real weights (weights.py)

from weights import (  # noqa: E402,F401  (re-exported: models.load_bert etc.)
    load_timm_vit, vit_config_from_timm, read_safetensors, bert_to_ours, load_bert, HF_ACT, HF_DEFAULTS, similarity, read_weights, count_blocks, hf_blocks, openai_blocks, pairs, pad_row, no_leftovers, hf_weights, load_clip_hf, load_clip_openai)
