"""Tests of the fast paths (issue #9): the SSF training paths, torch.compile, bench.model_speed.
CPU only, tiny seeded configs. Run: python -m pytest -q test_speed.py"""
import os
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
            if n.endswith("_ssf.scale"):   # some negative; none below LinearSSF's SSF_MIN_SCALE (own test)
                p.copy_(1 + 0.5 * torch.randn_like(p))
                p[p.abs() < 0.1] = 0.1
            elif n.endswith("_ssf.shift"):
                p.copy_(0.2 * torch.randn_like(p))
    m.freeze_backbone()
    return m


def plain_with_ssf(op: nn.Module, s: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference: op, then x * scale + shift, unfolded."""
    y = F.linear(x, op.weight.flatten(1), op.bias) if isinstance(op, nn.Conv2d) else op(x)
    return y * s.scale + s.shift if isinstance(s, M.SSF) else s(y)


SSF_PATHS = ["function", "fold", "addcmul"]   # models.SSF_TRAIN's values


@pytest.mark.parametrize("mode", SSF_PATHS)
@pytest.mark.parametrize("pre_norm", [True, False])
def test_ssf_train_paths_match_the_plain_formula(monkeypatch, mode, pre_norm):
    """Each SSF_TRAIN path, both towers (pre-norm, and the BERT post-norm layout), masked inputs,
    forward and backward: the logits and every SSF and head gradient equal those of x * scale + shift
    after each op, in fp32; inference (no grad) folds and gives the same logits."""
    cfg = tiny_cfg(pre_norm)
    m = ssf_model(cfg)
    batch = masked_batch(cfg, B=3, K=7)
    y = torch.tensor([0, 3, 4])

    def run():
        m.zero_grad(set_to_none=True)
        logits = m.forward_tokens(*batch)
        F.cross_entropy(logits, y).backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
        with torch.no_grad():   # inference folds every Linear's SSF into its weights
            return logits.detach(), grads, m.forward_tokens(*batch)

    monkeypatch.setattr(M, "SSF_TRAIN", mode)
    fast, fast_grads, fast_inf = run()
    monkeypatch.setattr(M, "with_ssf", plain_with_ssf)
    ref, ref_grads, ref_inf = run()
    assert sum("_ssf." in n for n in ref_grads) > 20 and any(n.startswith("head.") for n in ref_grads)
    assert fast_grads.keys() == ref_grads.keys() and all(g.abs().max() > 0 for g in ref_grads.values())
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_inf, ref, atol=1e-5, rtol=1e-5)
    for n, g in ref_grads.items():
        torch.testing.assert_close(fast_grads[n], g, atol=1e-5, rtol=1e-4, msg=n)


def ssf_layer(op: nn.Module, train_op: bool = False, seed: int = 0) -> M.SSF:
    """The SSF after op (a Linear or Conv2d), scales and shifts away from the identity; op frozen
    unless train_op."""
    torch.manual_seed(seed)
    s = M.SSF(op.weight.shape[0])
    with torch.no_grad():
        s.scale.copy_(1 + 0.5 * torch.randn_like(s.scale))
        s.scale[s.scale.abs() < 0.1] = 0.1
        s.shift.copy_(0.2 * torch.randn_like(s.shift))
    op.requires_grad_(train_op)
    return s


def layer_grads(fn, op: nn.Module, s: M.SSF, x: torch.Tensor, dy: torch.Tensor) -> dict:
    """Output and the gradients of x, the SSF and (if they train) op's parameters, for loss sum(y * dy)."""
    x = x.clone().requires_grad_(True)
    params = {"scale": s.scale, "shift": s.shift, **{n: p for n, p in op.named_parameters() if p.requires_grad}}
    y = fn(op, s, x)
    grads = torch.autograd.grad((y.float() * dy).sum(), [x, *params.values()])
    return {"y": y, "x": grads[0], **dict(zip(params, grads[1:]))}


@pytest.mark.parametrize("mode", SSF_PATHS)
@pytest.mark.parametrize("op", ["linear", "linear_no_bias", "conv", "linear_trained", "linear_empty"])
def test_with_ssf_layer_gradients_match_the_plain_formula(monkeypatch, mode, op):
    """One layer, (B, N, in) input: y and the gradients of the input, scale and shift equal
    op(x) * scale + shift in fp32, for a Linear with and without bias and the patch embedding's
    Conv2d on flattened patches, and an empty batch (zero gradients). A Linear whose weight trains
    gets its weight gradients too ("function" then falls back to the fold)."""
    torch.manual_seed(1)
    layer = {"linear": nn.Linear(12, 20), "linear_no_bias": nn.Linear(12, 20, bias=False),
             "conv": nn.Conv2d(3, 20, 2, 2), "linear_trained": nn.Linear(12, 20), "linear_empty": nn.Linear(12, 20)}[op]
    s = ssf_layer(layer, train_op=op == "linear_trained")
    B = 0 if op == "linear_empty" else 3
    x, dy = torch.randn(B, 5, 12), torch.randn(B, 5, 20)
    monkeypatch.setattr(M, "SSF_TRAIN", mode)
    got = layer_grads(M.with_ssf, layer, s, x, dy)
    want = layer_grads(plain_with_ssf, layer, s, x, dy)
    assert got.keys() == want.keys() and ("weight" in got) == (op == "linear_trained")
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5, msg=k)


def test_linear_ssf_damps_the_scale_gradient_below_min_scale():
    """LinearSSF divides by the scale to get the Linear's output back from y; where |scale| <
    SSF_MIN_SCALE it divides by +-SSF_MIN_SCALE instead: no inf or nan, that channel's scale gradient
    is the plain one times |scale| / SSF_MIN_SCALE (0 at 0), every other gradient is the plain one."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 6)
    s = ssf_layer(lin)
    tiny = torch.tensor([0.0, -1e-4, 5e-4])
    with torch.no_grad():
        s.scale[:3] = tiny
    x, dy = torch.randn(4, 12), torch.randn(4, 6)
    got = layer_grads(M.with_ssf, lin, s, x, dy)
    want = layer_grads(plain_with_ssf, lin, s, x, dy)
    assert all(g.isfinite().all() for g in got.values())
    damped = want["scale"][:3] * tiny.abs() / M.SSF_MIN_SCALE
    # out = (y - shift) / scale carries y's rounding times |y| / |scale * out|: ~1e-3 at 1e-4 here
    torch.testing.assert_close(got["scale"][:3], damped, atol=0, rtol=2e-2)
    assert got["scale"][0] == 0 and damped[1:].abs().min() > 1e-3
    want["scale"][:3] = got["scale"][:3]
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("mode", SSF_PATHS)
def test_ssf_keeps_the_activation_dtype_under_autocast(monkeypatch, mode):
    """Under bf16 autocast a trained SSF after a Linear gives bf16 (fp32 parameters must not promote
    the activation to fp32) and hands the input a bf16 gradient; the fp32 parameters get fp32
    gradients as close to the fp32 ones as bf16 allows."""
    monkeypatch.setattr(M, "SSF_TRAIN", mode)
    lin = nn.Linear(64, 48)
    s = ssf_layer(lin)
    x, dy = torch.randn(8, 16, 64), torch.randn(8, 16, 48)
    want = layer_grads(plain_with_ssf, lin, s, x, dy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer_grads(M.with_ssf, lin, s, x.bfloat16(), dy)   # the training path
        with torch.no_grad():
            y_inf = M.with_ssf(lin, s, x)                          # the inference path: folded
    assert got["y"].dtype == y_inf.dtype == got["x"].dtype == torch.bfloat16
    assert got["scale"].dtype == got["shift"].dtype == torch.float32
    for k in ("y", "x", "scale", "shift"):
        err = (got[k].float() - want[k]).norm() / want[k].norm()
        assert err < 1e-2, (k, err.item())


def train_step_flops(m: M.TwoTower) -> int:
    batch = masked_batch(m.cfg, B=2, K=16)
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(m.forward_tokens(*batch), torch.tensor([0, 1])).backward()
    return fc.get_total_flops()


def test_ssf_train_step_adds_no_matmul(monkeypatch):
    """Frozen backbone: an SSF step costs the matmul FLOPs of timm's LayerNorm-only step (forward and
    input gradients), not more, on the default path (LinearSSF) and with the addcmul after the Linear.
    Folding the SSF into the Linear's weight while it trains adds a weight-gradient matmul per Linear
    (+50 % over the blocks)."""
    torch.manual_seed(0)
    ln_only = M.TwoTower(tiny_cfg(adapter="none"), 5)
    for n, p in ln_only.named_parameters():
        p.requires_grad = n.startswith("head.") or ".norm" in n or n.startswith(("image.norm", "text.norm"))
    want = train_step_flops(ln_only)
    assert M.SSF_TRAIN == "function" and train_step_flops(ssf_model(tiny_cfg())) == want
    monkeypatch.setattr(M, "SSF_TRAIN", "addcmul")
    assert train_step_flops(ssf_model(tiny_cfg())) == want
    monkeypatch.setattr(M, "SSF_TRAIN", "fold")
    assert train_step_flops(ssf_model(tiny_cfg())) > 1.3 * want


# ----------------------------------------------------------------------------- torch.compile

def has_compiler() -> bool:
    """Inductor on the CPU writes C++; without a compiler torch.compile cannot run here."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not has_compiler() and not os.environ.get("CI"),   # CI has one: there it must run
                    reason="torch.compile (inductor) needs a C++ compiler on the CPU")
def test_compiled_masked_step_equals_eager():
    """The towers compiled with dynamic shapes, as train.py --compile does (models.compile_towers):
    masked batches with different numbers of kept patches, and the full batch, give eager's logits
    and SSF gradients (the default SSF_TRAIN, which compiles as SSF_COMPILED), with no graph break;
    the state dict keeps its names."""
    from torch._dynamo.utils import counters
    counters.clear()
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
    assert M.SSF_TRAIN == "function" and not counters["graph_break"], dict(counters["graph_break"])


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
    assert calls == [("forward", {"dynamic": True, "options": M.COMPILE_OPTIONS})] * 2


# ----------------------------------------------------------------------------- bench.py model_speed

def test_vit_flops_counts_the_matmuls_of_a_forward_and_a_frozen_backbone_step():
    """bench.vit_flops, the yardstick of the matmul-rate limit, equals PyTorch's FLOP counter on
    timm's ViT (attention as explicit matmuls): a forward, and a step training only LayerNorms + head."""
    import timm
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import bench_speed
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=32, depth=2)
    for n, p in ref.named_parameters():
        p.requires_grad = ".norm" in n or n.startswith(("norm.", "head."))
    x = torch.randn(1, 3, 32, 32)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fwd:
        ref(x)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as step:
        ref(x).sum().backward()
    assert bench_speed.vit_flops(M.vit_config_from_timm(ref), 4, 7) == (fwd.get_total_flops(), step.get_total_flops())


def test_bench_model_speed_smoke(monkeypatch, tmp_path):
    """model_speed on a 2-block ViT at 32 px: every row measured, ours equals timm, the SSF paths' gradients
    equal the plain formula's (fp32 here), each row's time split by kernel kind (--profile), JSON written."""
    import json

    import bench
    import bench_speed
    monkeypatch.setitem(bench_speed.SPEED_VITS, "cpu", ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}))
    out = tmp_path / "bench.json"
    bench.main(["--only", "model_speed", "--batch", "4", "--steps", "1", "--threads", "1", "--profile",
                "--out", str(out)])
    res = json.loads(out.read_text())["results"]["model_speed"]
    rows = {r["name"]: r for r in res["rows"]}
    assert {"infer timm", "infer ours", "step timm LN", "step ours SSF", "step ours SSF fold", "step ours SSF addcmul",
            "step ours prompt", "step ours SSF keep 25%"} <= set(rows)
    assert res["ssf_train_default"] == "function" and rows["step ours SSF"]["note"].startswith("LinearSSF")
    assert res["ssf_grad_rel_err"].keys() == {"function", "fold", "addcmul"}
    assert all(e < 1e-5 for errs in res["ssf_grad_rel_err"].values() for e in errs.values())   # fp32 on cpu
    assert all(r["img_s"] > 0 and r["share_of_limit"] > 0 for r in rows.values())   # a timed ratio: no upper bound
    assert rows["step ours SSF keep 25%"]["patches"] == 1 and rows["step ours SSF keep 25%"]["vs"] == "step ours SSF"
    assert res["max_abs_diff_ours_vs_timm"] < 1e-4 and res["device_name"] is None and res["matmul"]["tflops"] > 0
    for r in rows.values():   # the profile: the kinds add up to the whole, and a step does matmuls and attention
        p = r["profile"]
        assert p["clock"] == "cpu self" and p["ms"] > 0 and sum(p["ms_by_kind"].values()) == pytest.approx(p["ms"])
        assert p["ms_by_kind"]["matmul"] > 0 and p["ms_by_kind"]["attention"] > 0 and p["ms_by_kind"]["other"] > 0
        assert p["top"] and p["top"][0]["ms"] == max(t["ms"] for t in p["top"])


def test_a_profiler_failure_keeps_the_clocked_rows(monkeypatch, tmp_path):
    import json

    import bench
    import bench_speed

    def broken(*a, **k):
        raise RuntimeError("no CUPTI")
    monkeypatch.setitem(bench_speed.SPEED_VITS, "cpu", ("vit_tiny_patch16_224", {"img_size": 32, "depth": 1}))
    monkeypatch.setattr(bench_speed, "profile_split", broken)
    out = tmp_path / "bench.json"
    bench.main(["--only", "model_speed", "--batch", "2", "--steps", "1", "--threads", "1", "--profile", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]["model_speed"]["rows"]
    assert rows and all(r["img_s"] > 0 and r["profile"] == {"error": "RuntimeError: no CUPTI"} for r in rows)


@pytest.mark.parametrize("name,kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "matmul"), ("aten::addmm", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("triton_poi_fused_add_mul_native_layer_norm_0", "other"), ("triton_tem_fused_addmm_3", "matmul"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "other")])
def test_profile_kinds_name_cuda_kernels_and_cpu_operators(name, kind):
    import bench_speed
    assert bench_speed.kernel_kind(name) == kind


def test_timed_makes_exactly_the_repeats_it_reports():
    """bench.timed: `repeats` timed calls of each function (the remainder spread over the blocks, fewer
    blocks than 5 where repeats < 5), each block after `warmup` untimed calls."""
    import bench
    for repeats, warmup, rounds in ((50, 2, 5), (7, 5, 5), (3, 1, 3), (12, 0, 5)):
        calls = {"a": 0, "b": 0}

        def call(k):
            calls[k] += 1
        ms = bench.timed({k: (lambda k=k: call(k)) for k in calls}, repeats, warmup)
        assert set(ms) == {"a", "b"} and all(v >= 0 for v in ms.values())
        assert calls == {"a": repeats + warmup * rounds, "b": repeats + warmup * rounds}


def test_bench_results_each_name_their_machine(monkeypatch, tmp_path, capsys):
    """Every result in bench.py's JSON keeps the machine it ran on: a later run of another benchmark
    (another machine) adds its own and leaves the earlier one's. Bad options are one error line."""
    import json
    import bench
    out = tmp_path / "b.json"
    out.write_text(json.dumps({"machine": {"gpu": "H200"}, "results": {"sdpa_shapes": {"x": 1, "machine": {"gpu": "H200"}}}}))
    monkeypatch.setitem(bench.BENCHMARKS, "replay_cost", lambda o: {"ms": 1.0})
    monkeypatch.setattr(bench, "show", lambda name, res: None)
    bench.main(["--only", "replay_cost", "--out", str(out)])
    r = json.loads(out.read_text())["results"]
    assert r["sdpa_shapes"]["machine"] == {"gpu": "H200"} and r["replay_cost"]["ms"] == 1.0
    assert r["replay_cost"]["machine"] == bench.machine()
    capsys.readouterr()
    for argv in (["--sizes", "5k"], ["--repeats", "0"], ["--keep-image", "1.5"], ["--only", "replay_cost", "--run", "x"]):
        with pytest.raises(SystemExit) as e:
            bench.main(argv + ["--out", str(tmp_path / "c.json")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "c.json").exists()
