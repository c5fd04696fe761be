"""Tests of the fast paths (issue #9): SSF folded on the fly, torch.compile, bench.model_speed.
CPU only, tiny seeded configs. Run: python -m pytest -q test_speed.py"""
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import models as M

torch.set_num_threads(2)


def tiny_cfg(pre_norm: bool = True, **kw) -> M.ModelConfig:
    vit = M.ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, heads=2, embed_dim=24)
    txt = M.TextConfig(vocab_size=50, context=12, dim=32, depth=2, heads=2, embed_dim=24, pre_norm=pre_norm)
    return replace(M.ModelConfig(vit=vit, text=txt, adapter="ssf"), **kw)


def masked_batch(cfg: M.ModelConfig, B: int, K: int, seed: int = 0):
    """K kept patches per image at random indices, captions of 9 tokens with 2 pads."""
    g = torch.Generator().manual_seed(seed)
    N, P = cfg.vit.n_patches, 3 * cfg.vit.patch_size ** 2
    pixels = torch.randint(0, 256, (B, K, P), generator=g).to(torch.uint8)
    idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)])   # (B, K)
    ids = torch.randint(4, cfg.text.vocab_size, (B, 9), generator=g)
    ids[:, -2:] = cfg.text.pad_id
    pos = torch.arange(9).expand(B, -1)
    return pixels, idx, ids, pos


def ssf_model(cfg: M.ModelConfig) -> M.TwoTower:
    """Frozen backbone, SSF scales and shifts far from the identity."""
    torch.manual_seed(0)
    m = M.TwoTower(cfg, n_classes=5)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("_ssf.scale"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif n.endswith("_ssf.shift"):
                p.copy_(0.2 * torch.randn_like(p))
    m.freeze_backbone()
    return m


def plain_with_ssf(op: nn.Module, s: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference: op, then x * scale + shift, unfolded."""
    y = F.linear(x, op.weight.flatten(1), op.bias) if isinstance(op, nn.Conv2d) else op(x)
    return y * s.scale + s.shift if isinstance(s, M.SSF) else s(y)


@pytest.mark.parametrize("fold_training", [False, True])
@pytest.mark.parametrize("pre_norm", [True, False])
def test_ssf_fast_path_matches_the_plain_formula(monkeypatch, fold_training, pre_norm):
    """Both towers (pre-norm, and the BERT post-norm layout), forward and backward: the logits and
    every SSF gradient equal those of x * scale + shift after each op, in fp32."""
    cfg = tiny_cfg(pre_norm)
    m = ssf_model(cfg)
    batch = masked_batch(cfg, B=3, K=7)
    y = torch.tensor([0, 3, 4])

    def run():
        m.zero_grad(set_to_none=True)
        logits = m.forward_tokens(*batch)
        F.cross_entropy(logits, y).backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if "_ssf." in n}
        with torch.no_grad():   # inference folds every Linear's SSF into its weights
            return logits.detach(), grads, m.forward_tokens(*batch)

    monkeypatch.setattr(M, "SSF_FOLD_TRAINING", fold_training)
    fast, fast_grads, fast_inf = run()
    monkeypatch.setattr(M, "with_ssf", plain_with_ssf)
    ref, ref_grads, ref_inf = run()
    assert len(ref_grads) == len(fast_grads) > 20 and all(g.abs().max() > 0 for g in ref_grads.values())
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_inf, ref, atol=1e-5, rtol=1e-5)
    for n, g in ref_grads.items():
        torch.testing.assert_close(fast_grads[n], g, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("fold_training", [False, True])
def test_ssf_keeps_the_activation_dtype_under_autocast(monkeypatch, fold_training):
    """Under bf16 autocast a trained SSF after a Linear gives bf16 (fp32 parameters must not promote
    the activation to fp32); the gradients still reach the fp32 parameters."""
    monkeypatch.setattr(M, "SSF_FOLD_TRAINING", fold_training)
    torch.manual_seed(0)
    lin, s = nn.Linear(8, 16), M.SSF(16)
    lin.requires_grad_(False)
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = M.with_ssf(lin, s, x)                        # the training path: folded, or addcmul after the Linear
        with torch.no_grad():
            y_inf = M.with_ssf(lin, s, x)                # the inference path: folded into the weight
    assert y.dtype == y_inf.dtype == torch.bfloat16
    y.float().sum().backward()
    assert s.scale.grad.dtype == torch.float32 and s.scale.grad.abs().max() > 0

def train_step_flops(m: M.TwoTower) -> int:
    batch = masked_batch(m.cfg, B=2, K=16)
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(m.forward_tokens(*batch), torch.tensor([0, 1])).backward()
    return fc.get_total_flops()


def test_ssf_train_step_adds_no_matmul(monkeypatch):
    """Frozen backbone: an SSF step costs the matmul FLOPs of timm's LayerNorm-only step (forward and
    input gradients), not more, without the fold while training (SSF_FOLD_TRAINING = False). Folding
    the SSF into the Linear's weight while it trains adds a weight-gradient matmul per Linear (+50 %
    over the blocks); it is the default only because it measured faster on the GPU anyway."""
    monkeypatch.setattr(M, "SSF_FOLD_TRAINING", False)
    torch.manual_seed(0)
    ln_only = M.TwoTower(tiny_cfg(adapter="none"), 5)
    for n, p in ln_only.named_parameters():
        p.requires_grad = n.startswith("head.") or ".norm" in n or n.startswith(("image.norm", "text.norm"))
    want = train_step_flops(ln_only)
    assert train_step_flops(ssf_model(tiny_cfg())) == want
    monkeypatch.setattr(M, "SSF_FOLD_TRAINING", True)
    assert train_step_flops(ssf_model(tiny_cfg())) > 1.3 * want


# ----------------------------------------------------------------------------- torch.compile

def has_compiler() -> bool:
    """Inductor on the CPU writes C++; without a compiler torch.compile cannot run here."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not has_compiler(), reason="torch.compile (inductor) needs a C++ compiler on the CPU")
def test_compiled_masked_step_equals_eager():
    """The towers compiled with dynamic shapes, as train.py --compile does (models.compile_towers):
    masked batches with different numbers of kept patches, and the full batch, give eager's logits
    and SSF gradients; the state dict keeps its names."""
    cfg = tiny_cfg()
    cfg = replace(cfg, vit=replace(cfg.vit, depth=1), text=replace(cfg.text, depth=1))
    models = {"eager": ssf_model(cfg), "compiled": ssf_model(cfg)}
    M.compile_towers(models["compiled"])
    assert models["compiled"].state_dict().keys() == models["eager"].state_dict().keys()
    for B, K in ((3, 5), (4, 9), (3, cfg.vit.n_patches)):
        batch = masked_batch(cfg, B, K, seed=K)
        y = torch.arange(B) % 5
        out = {}
        for name, m in models.items():
            m.zero_grad(set_to_none=True)
            logits = m.forward_tokens(*batch)
            F.cross_entropy(logits, y).backward()
            out[name] = logits.detach(), [p.grad.clone() for n, p in m.named_parameters() if "_ssf." in n]
        torch.testing.assert_close(out["compiled"][0], out["eager"][0], atol=1e-5, rtol=1e-5)
        for g, want in zip(out["compiled"][1], out["eager"][1]):
            torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-4)


def test_train_compile_flag_compiles_the_training_forward(tmp_path, monkeypatch):
    """--compile reaches Config.compile, and train() then runs both towers through torch.compile
    with dynamic shapes (recorded here, not compiled: the test above checks the compiled numbers)."""
    import train as T
    from test_exmask import tiny_train_cfg
    seen = {}
    monkeypatch.setattr(T, "train", lambda cfg: seen.setdefault("cfg", cfg))
    T.main(["--compile", "--out", str(tmp_path / "o")])
    assert seen["cfg"].compile and not T.Config().compile
    monkeypatch.undo()
    calls = []

    def fake_compile(fn, **kw):
        calls.append((fn.__name__, kw))
        return fn
    monkeypatch.setattr(torch, "compile", fake_compile)
    T.train(tiny_train_cfg(tmp_path, compile=True, phases=1))
    assert calls == [("forward", {"dynamic": True})] * 2


# ----------------------------------------------------------------------------- bench.py model_speed

def test_vit_flops_counts_the_matmuls_of_a_forward_and_a_frozen_backbone_step():
    """bench.vit_flops, the yardstick of the matmul-rate limit, equals PyTorch's FLOP counter on
    timm's ViT (attention as explicit matmuls): a forward, and a step training only LayerNorms + head."""
    import timm
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import bench
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=32, depth=2)
    for n, p in ref.named_parameters():
        p.requires_grad = ".norm" in n or n.startswith(("norm.", "head."))
    x = torch.randn(1, 3, 32, 32)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fwd:
        ref(x)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as step:
        ref(x).sum().backward()
    assert bench.vit_flops(M.vit_config_from_timm(ref), 4, 7) == (fwd.get_total_flops(), step.get_total_flops())


def test_bench_model_speed_smoke(monkeypatch, tmp_path):
    """model_speed on a 2-block ViT at 32 px: every row measured, ours equals timm, JSON written."""
    import json

    import bench
    monkeypatch.setitem(bench.SPEED_VITS, "cpu", ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}))
    out = tmp_path / "bench.json"
    bench.main(["--only", "model_speed", "--batch", "4", "--steps", "1", "--threads", "1", "--out", str(out)])
    res = json.loads(out.read_text())["results"]["model_speed"]
    rows = {r["name"]: r for r in res["rows"]}
    assert {"infer timm", "infer ours", "step timm LN", "step ours SSF", "step ours SSF fold", "step ours prompt",
            "step ours SSF keep 25%"} <= set(rows)
    assert all(r["img_s"] > 0 and 0 < r["share_of_limit"] < 2 for r in rows.values())
    assert rows["step ours SSF keep 25%"]["patches"] == 1 and rows["step ours SSF keep 25%"]["vs"] == "step ours SSF"
    assert res["max_abs_diff_ours_vs_timm"] < 1e-4 and res["device_name"] is None and res["matmul"]["tflops"] > 0
