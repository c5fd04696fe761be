"""Speed benchmarks (issue #9), run through bench.py: our ViT against timm's (model_speed), the
phase loop against its own steps (phase_loop) and what a new shape costs a step (sdpa_shapes), with
the yardsticks they share: the matmul FLOPs of a
ViT step (vit_flops), the achieved matmul rate (matmul_rate) and a synchronised clock (clock).

    python bench.py --only model_speed --only phase_loop --device cuda [--compile]

Each benchmark takes bench.Opts (o) and returns a JSON-able dict."""
from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import data as D
import models as M


def vit_flops(cfg: M.ViTConfig, patches: int, classes: int) -> tuple[int, int]:
    """Matmul FLOPs per image of (forward, frozen-backbone training step) of a ViT on `patches`
    patches with a linear head. Forward: 2 per multiply-add of the patch embedding, the linears (T
    tokens, prefix included) and attention (Q K^T and A V: 4 T^2 D per block). Step: the forward and
    the gradients of the activations (linears again, attention twice: dQ, dK, dV, dA); of the
    weights only the head's. No gradient reaches the pixels, so the patch embedding runs once."""
    T, D, Hd = patches + (cfg.pool == "cls"), cfg.dim, int(cfg.dim * cfg.mlp_ratio)
    linear = 2 * T * (3 * D * D + D * D + 2 * D * Hd) * cfg.depth
    attn = 4 * T * T * D * cfg.depth
    embed = 2 * patches * 3 * cfg.patch_size ** 2 * D
    head = 2 * D * classes
    return embed + linear + attn + head, embed + 2 * linear + 3 * attn + 3 * head


def matmul_rate(device: str, repeats: int = 10) -> dict:
    """Achieved FLOP/s of one large square matmul: bf16 on cuda, fp32 on cpu."""
    cuda = device.startswith("cuda")
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = clock(lambda: a @ b, repeats, 3, cuda)["ms"]
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "ms": ms, "tflops": 2 * n ** 3 / ms / 1e9}


def clock(fn, repeats: int, warmup: int, cuda: bool) -> dict:
    """Median ms of fn after a first call (timed alone: it compiles, when compiled) and a warmup;
    on cuda also the peak memory allocated during the timed calls (every model's weights included)."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return {"ms": 1e3 * statistics.median(times), "first_call_s": first,
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None}


# kernel (cuda) or operator (cpu) names by what they compute, first match wins; the rest is "other"
# (elementwise, norms, reductions, copies: inductor's fused triton_poi/red/per kernels land there too;
# its triton_tem template kernels, max_autotune's GEMMs, are matmuls)
KERNEL_KINDS = (("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
                ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "aten::mm", "aten::addmm", "aten::bmm",
                            "aten::matmul", "aten::linear", "aten::baddbmm", "_mm_", "splitk", "triton_tem")))


def kernel_kind(name: str) -> str:
    n = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in n for k in keys)), "other")


def profile_split(fn, steps: int, cuda: bool, top: int = 8) -> dict:
    """fn's time by what it computes, from torch.profiler over `steps` calls (after clock's warmup):
    on cuda each kernel's device time, on cpu each operator's own (self) time. -> ms per call in
    total and per kind (KERNEL_KINDS: matmul, attention, other), each kind's share, and the `top`
    kernels by time (name, kind, ms per call, calls per call)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if cuda and e.device_type != DeviceType.CUDA:
            continue                                  # host-side operators: their kernels are counted
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0 and not e.key.startswith("ProfilerStep"):
            rows.append((e.key, us / 1e3 / steps, e.count / steps))
    total = sum(ms for _, ms, _ in rows) or float("nan")
    kinds = {k: 0.0 for k in ("matmul", "attention", "other")}
    for name, ms, _ in rows:
        kinds[kernel_kind(name)] += ms
    rows.sort(key=lambda r: -r[1])
    return {"clock": "device" if cuda else "cpu self", "ms": total, "ms_by_kind": kinds,
            "share_by_kind": {k: v / total for k, v in kinds.items()},
            "top": [{"name": n[:120], "kind": kernel_kind(n), "ms": ms, "calls": c} for n, ms, c in rows[:top]]}


# models.SSF_TRAIN's paths, as model_speed's rows note them
SSF_PATHS = {"function": "LinearSSF: one matmul, no weight-gradient matmul, one fused reduction per Linear",
             "fold": "SSF folded into Linear weights while training (weight-gradient matmuls)",
             "addcmul": "addcmul after each Linear (activation-sized passes)"}


@contextlib.contextmanager
def ssf_train(mode: str, setting: str = "SSF_TRAIN"):
    """models.SSF_TRAIN (or the setting named, e.g. SSF_COMPILED: the path under torch.compile) = mode
    inside, restored after."""
    old = getattr(M, setting)
    setattr(M, setting, mode)
    try:
        yield
    finally:
        setattr(M, setting, old)


def ssf_grad_check(mode: str, cfg: M.ViTConfig, dev: str, amp) -> dict:
    """One qkv-sized Linear + SSF on one image's tokens, trained through models.with_ssf on `mode`
    under model_speed's autocast: relative error (L2) of y and of the gradients of the input, scale
    and shift against the plain formula in fp32. Checks on the device itself what the CPU tests
    cannot, LinearSSF's CUDA reduction; bf16 alone gives a few 1e-3."""
    g = torch.Generator(device=dev).manual_seed(0)
    D, T = cfg.dim, cfg.n_patches + 1
    lin = nn.Linear(D, 3 * D).to(dev).requires_grad_(False)
    s = M.SSF(3 * D).to(dev)
    with torch.no_grad():   # as in test_speed: none below LinearSSF's SSF_MIN_SCALE, where it damps ds
        s.scale.add_(0.5 * torch.randn(3 * D, device=dev, generator=g))
        s.scale[s.scale.abs() < 0.1] = 0.1
        s.shift.add_(0.2 * torch.randn(3 * D, device=dev, generator=g))
    x = torch.randn(1, T, D, device=dev, generator=g)
    dy = torch.randn(1, T, 3 * D, device=dev, generator=g)

    def run(fn, ctx):
        xg = x.clone().requires_grad_(True)
        with ctx:
            y = fn(xg)
        grads = torch.autograd.grad((y.float() * dy).sum(), [xg, s.scale, s.shift])
        return [y.float(), *(t.float() for t in grads)]
    with ssf_train(mode):
        got = run(lambda xg: M.with_ssf(lin, s, xg), amp)
    want = run(lambda xg: lin(xg) * s.scale + s.shift, contextlib.nullcontext())
    return {k: ((a - b).norm() / b.norm()).item() for k, a, b in zip(("y", "dx", "ds", "dt"), got, want)}


# model_speed's timm ViT per device: ViT-B/16 at 224 px on cuda; a ViT-Ti/16 at 112 px on cpu (a minute)
SPEED_VITS = {"cuda": ("vit_base_patch16_224", {}), "cpu": ("vit_tiny_patch16_224", {"img_size": 112})}


def model_speed(o) -> dict:
    """Our ViT against timm's VisionTransformer with the same weights, on o.device (bf16 autocast
    on cuda, fp32 on cpu), B images per call: inference img/s; a training step (forward, backward,
    Adam) with a linear head of 100 classes: ours with SSF (the default adapter) vs timm with only
    the LayerNorms trained (the same matmuls: frozen weights, activation gradients), ours with the
    LayerNorms trained (the implementation alone), ours with SSF on each of models.SSF_TRAIN's paths
    ("step ours SSF" is the default, "function"; then "fold" and "addcmul"), with prompts, and masked
    (25 % and 50 % of patches kept); with --compile the SSF and timm steps again under
    torch.compile(dynamic=True), as train.py --compile runs, and the SSF step compiled for its one
    shape (dynamic=False: what dynamic shapes cost). Before the rows, ssf_grad_check.
    Each row's share of the matmul-rate limit: achieved FLOP/s of a large matmul / the row's
    matmul FLOPs per image (vit_flops; a frozen-backbone step is ~2x the forward, not 3x)."""
    import exmask
    import timm
    dev, cuda = o.device, o.device.startswith("cuda")
    torch.set_num_threads(o.threads or torch.get_num_threads())
    name, kw = (o.vit, {}) if o.vit else SPEED_VITS["cuda" if cuda else "cpu"]
    B, C = o.batch or (256 if cuda else 16), 100
    steps = o.steps or (10 if cuda else 3)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, num_classes=C, **kw).to(dev)
    cfg = M.vit_config_from_timm(ref)
    N = cfg.n_patches
    g = torch.Generator(device=dev).manual_seed(0)
    images = torch.randint(0, 256, (B, 3, cfg.image_size, cfg.image_size), device=dev, generator=g).float()
    pixels = M.patchify(images, cfg.patch_size).to(torch.uint8)                    # (B, N, P), as stored
    y = torch.randint(0, C, (B,), device=dev, generator=g)
    mean, std = (torch.tensor(v, device=dev).view(3, 1, 1) * 255 for v in (cfg.mean, cfg.std))

    def ours(adapter: str) -> tuple[M.ViT, nn.Linear]:
        vit = M.ViT(cfg, adapter, M.ModelConfig().prompt_len)
        M.load_timm_vit(vit, ref.state_dict())
        with torch.no_grad():   # adapters away from their identity init, as once trained
            for n, p in vit.named_parameters():
                if "_ssf." in n or ".prompt" in n:
                    p.add_(0.1 * torch.randn_like(p))
        head = nn.Linear(cfg.dim, C)
        head.load_state_dict(ref.head.state_dict())
        return vit.to(dev), head.to(dev)

    def step(forward, params: list, inputs: tuple):
        opt = torch.optim.Adam(params, lr=1e-5)

        def run():
            with amp:
                loss = F.cross_entropy(forward(*inputs).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    def train_only(model: nn.Module, rule) -> list:
        for n, p in model.named_parameters():
            p.requires_grad = rule(n)
        return [p for p in model.parameters() if p.requires_grad]

    def kept(K: int) -> tuple:
        idx = torch.rand(B, N, device=dev, generator=g).argsort(1)[:, :K].sort(1).values   # (B, K)
        return M.gather_tokens(pixels, idx), idx

    rows = []

    def measure(name: str, kind: str, patches: int, fn, ref_row: str = "", note: str = "") -> None:
        r = {"name": name, "kind": kind, "patches": patches, **clock(fn, steps, 2, cuda)}
        if o.profile:
            try:
                r["profile"] = profile_split(fn, steps, cuda)
            except Exception as e:   # a profiler failure costs the split, never the clocked row
                r["profile"] = {"error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
        r["img_s"] = B / r["ms"] * 1e3
        fwd, stp = vit_flops(cfg, patches, C)
        r["limit_img_s"] = rate["tflops"] * 1e12 / (fwd if kind == "inference" else stp)
        r["share_of_limit"] = r["img_s"] / r["limit_img_s"]
        base = next((x for x in rows if x["name"] == ref_row and "img_s" in x), None)   # not a failed row
        if base:
            r["vs"], r["speed_ratio"] = ref_row, r["img_s"] / base["img_s"]
        r["note"] = note
        rows.append(r)
        show_speed_row(r)
        if o.profile:
            show_profile(r["profile"])

    rate = matmul_rate(dev)
    fwd, stp = vit_flops(cfg, N, C)
    print(f"model_speed on {torch.cuda.get_device_name() if cuda else 'cpu'}: timm {name} {kw or ''}, batch {B}, "
          f"{rate['dtype']} matmul {rate['tflops']:.3g} TFLOP/s, GFLOP/img {fwd / 1e9:.2f} forward, "
          f"{stp / 1e9:.2f} step", flush=True)
    show_speed_row(None)

    # (a) inference
    plain, plain_head = ours("none")
    ssf_vit, ssf_head = ours("ssf")
    timm_pooled = lambda: ref.forward_head(ref.forward_features((images - mean) / std), pre_logits=True)  # (B, D)
    ref.eval()   # timm in train mode under inference_mode takes a slow path on cpu (5x here)
    with torch.inference_mode(), amp:
        diff = (plain.forward_images(images) - timm_pooled()).abs().max().item()
        measure("infer timm", "inference", N, timm_pooled)
        measure("infer ours", "inference", N, lambda: plain.forward_images(images), "infer timm")
        measure("infer ours SSF unmerged", "inference", N, lambda: ssf_vit.forward_images(images), "infer timm",
                "SSF folded into the weights per call")

    grad_check = {mode: ssf_grad_check(mode, cfg, dev, amp) for mode in SSF_PATHS}
    print("  SSF gradients, relative error against fp32 (a Linear of the model's size, one image):", flush=True)
    for mode, err in grad_check.items():
        print(f"    {mode:<9}" + " ".join(f"{k} {v:.1e}" for k, v in err.items()), flush=True)

    # (b)-(d) training steps, eager
    ref.train()
    is_norm = lambda n: ".norm" in n or n.startswith(("norm.", "head."))
    is_adapter = lambda n: "_ssf." in n or ".prompt" in n
    full = (pixels, M.all_patches(pixels).contiguous())   # strides as kept(K)'s: no recompile for them
    timm_params = train_only(ref, is_norm)
    measure("step timm LN", "step", N, step(lambda im: ref((im - mean) / std), timm_params, (images,)))
    plain_params = train_only(plain, is_norm) + list(plain_head.parameters())
    measure("step ours LN", "step", N, step(lambda p, i: plain_head(plain(p, i)), plain_params, full), "step timm LN")
    ssf_params = train_only(ssf_vit, is_adapter) + list(ssf_head.parameters())
    ssf_fwd = lambda p, i: ssf_head(ssf_vit(p, i))
    measure("step ours SSF", "step", N, step(ssf_fwd, ssf_params, full), "step timm LN", SSF_PATHS[M.SSF_TRAIN])
    for mode in ("fold", "addcmul"):
        with ssf_train(mode):
            measure(f"step ours SSF {mode}", "step", N, step(ssf_fwd, ssf_params, full), "step timm LN",
                    SSF_PATHS[mode])
    prompt_vit, prompt_head = ours("prompt")
    prompt_params = train_only(prompt_vit, is_adapter) + list(prompt_head.parameters())
    measure("step ours prompt", "step", N, step(lambda p, i: prompt_head(prompt_vit(p, i)), prompt_params, full),
            "step timm LN")
    for share in (0.5, 0.25):
        K = exmask.keep_count(N, share)
        measure(f"step ours SSF keep {share:.0%}", "step", K, step(ssf_fwd, ssf_params, kept(K)), "step ours SSF")

    # compiled, as train.py --compile (models.compiled: dynamic shapes, one graph for every kept
    # count). A row that fails to compile is recorded with its error and the others still run.
    if o.compile:
        def attempt(name: str, *args, **kw) -> None:
            try:
                measure(name, *args, **kw)
            except Exception as e:   # inductor's failures are internal errors of many kinds
                msg = f"{type(e).__name__}: {D.first_line(e, 300)}"
                rows.append({"name": name, "error": msg})
                print(f"  {name:<34} failed: {msg}", flush=True)
                torch._dynamo.reset()

        ctimm, cours = M.compiled(timm_pooled), M.compiled(lambda: plain.forward_images(images))
        ref.eval()
        with torch.inference_mode(), amp:
            attempt("compiled infer timm", "inference", N, ctimm, "infer timm", "first_call_s includes compiling")
            attempt("compiled infer ours", "inference", N, cours, "compiled infer timm")
        ref.train()
        ctimm = M.compiled(ref)
        attempt("compiled step timm LN", "step", N, step(lambda im: ctimm((im - mean) / std), timm_params, (images,)),
                "step timm LN", "first_call_s includes compiling")
        cvit = M.compiled(ssf_vit)
        cfwd = lambda p, i: ssf_head(cvit(p, i))
        attempt("compiled step ours SSF", "step", N, step(cfwd, ssf_params, full), "compiled step timm LN",
                SSF_PATHS[M.SSF_COMPILED] + " (the default path under torch.compile)")
        for share in (0.5, 0.25):
            K = exmask.keep_count(N, share)
            attempt(f"compiled step ours SSF keep {share:.0%}", "step", K, step(cfwd, ssf_params, kept(K)),
                    "compiled step ours SSF")
        # the same step compiled for its one shape: what dynamic shapes cost inductor (the loop's shapes vary)
        torch._dynamo.reset()   # a fresh cache: the dynamic graphs' guards would also pass this shape
        svit = M.compiled(ssf_vit, dynamic=False)
        attempt("compiled static step ours SSF", "step", N, step(lambda p, i: ssf_head(svit(p, i)), ssf_params, full),
                "compiled step ours SSF", "torch.compile(dynamic=False): one shape")

    return {"device": dev, "device_name": torch.cuda.get_device_name() if cuda else None, "timm_model": name,
            "timm_kwargs": kw, "vit": {k: getattr(cfg, k) for k in ("image_size", "patch_size", "dim", "depth", "heads")},
            "batch": B, "classes": C, "autocast": "bf16" if cuda else None, "steps_timed": steps, "warmup": 2,
            "threads": torch.get_num_threads(), "compile": o.compile, "profile": o.profile, "matmul": rate,
            "gflop_per_img": {"forward": fwd / 1e9, "step": stp / 1e9}, "max_abs_diff_ours_vs_timm": diff,
            "ssf_train_default": M.SSF_TRAIN, "ssf_grad_rel_err": grad_check, "rows": rows}


def phase_loop(o, base=None) -> dict:
    """The phase loop against its own steps: `train.run_method` for exmask (10 phases of 10 classes,
    3 epochs, batch 32, the default settings) with the time spent in training, in choosing and masking
    exemplars, in the head step and in evaluation measured apart; then every step the loop took, timed alone (the same
    model, batch shapes and replay size, warm, synchronised). share = steps alone / whole phase loop.
    cpu: the default towers on the embedded data (python train.py's run); cuda: a randomly initialised
    timm ViT-B/16 (or --vit) at 224 px with the default text tower, on the embedded data's 6,000
    image-caption pairs upsampled to 224 px, bf16 autocast; --compile: train.py --compile; --vit: that
    timm ViT (random weights) on any device. `base`: a train.Config to start from (tests)."""
    import timm
    import exmask
    import train as T
    from towers import default_backbone
    dev, cuda = o.device, o.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.set_num_threads(o.threads or torch.get_num_threads())
    cfg = replace(base or T.Config(), device=dev, quiet=True, export=False, compile=o.compile,
                  replay_passes=o.replay_passes, out=tempfile.mkdtemp())
    mcfg, state, tok = default_backbone(cfg, dev, T.console(cfg))
    raw = D.make_synth(cfg.synth)
    if cuda or o.vit:   # a real-scale image tower, random weights (speed does not depend on them)
        torch.manual_seed(0)
        ref = timm.create_model(o.vit or "vit_base_patch16_224", pretrained=False, num_classes=0)
        vit = M.ViT(M.vit_config_from_timm(ref))
        M.load_timm_vit(vit, ref.state_dict())
        mcfg = replace(mcfg, vit=vit.cfg, shared_space=False)   # a tower of its own: no shared space
        state = {k: v for k, v in state.items() if not k.startswith("image.")} | {f"image.{k}": v
                                                                                  for k, v in vit.state_dict().items()}
        S = vit.cfg.image_size
        raw["images"] = F.interpolate(raw["images"].float(), size=(S, S), mode="nearest").to(torch.uint8)
    raw["is_train"] = ~raw["is_test"]
    data = T.prepare(raw, cfg, mcfg, tok)

    # mask_sets: the masks of the new rows' masked views (--mask-new), made at the start of each
    # phase's training (train_phase); timed apart from its steps (the exemplars' masks are in candidates)
    spent = {"train_phase": 0.0, "candidates": 0.0, "evaluate": 0.0, "mask_sets": 0.0, "balanced_head": 0.0}
    real = {k: getattr(T, k) for k in spent}

    def timed_part(name):
        def run(*a, **k):
            sync()
            t = time.perf_counter()
            out = real[name](*a, **k)
            sync()
            spent[name] += time.perf_counter() - t
            return out
        return run

    for k in spent:
        setattr(T, k, timed_part(k))
    try:
        t0 = time.perf_counter()
        res, model = T.run_method(cfg, "exmask", data, mcfg, state, tok, T.console(cfg))
        loop_s = time.perf_counter() - t0
    finally:
        for k, fn in real.items():
            setattr(T, k, fn)

    # every step again, alone: the same shapes (new batch, captions cut to the longest as the loop
    # cuts them; from phase 2 on, with --mask-new, those rows again masked at the --keep-image share,
    # in one pass with the exemplars replayed at the share the memory kept for them then: the fill
    # gives exemplars more patches than --keep-image where a class's rows all fit)
    phase_cls = D.phase_classes(list(range(len(data["class_names"]))), cfg.phases)
    N, P = data["patches"].shape[1:]
    K = exmask.keep_count(N, cfg.keep_image)
    pad = mcfg.text.pad_id
    g = torch.Generator().manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-5, foreach=True)   # as train.train_phase
    amp = M.autocast(dev)
    model.train()
    step_ms, alone_s, shapes = {}, 0.0, []   # step_ms: (ms, caption columns) by step shape
    for t in range(cfg.phases):
        n_new = int((data["is_train"] & torch.isin(data["labels"], torch.tensor(phase_cls[t]))).sum())
        n_mem = res["memory_per_phase"][t - 1]["exemplars"] if t else 0
        per_epoch, B, R = T.phase_plan(cfg, n_new, n_mem)
        Bm = round(B * min(cfg.mask_new, 1.0)) if n_mem else 0     # masked new views per step, on average
        Kr = max(1, round(res["memory_per_phase"][t - 1]["mean_kept_patches"])) if t else K   # patches an exemplar kept
        key = (B, Bm, R, Kr)
        if key not in step_ms:
            rows = torch.randint(len(data["labels"]), (B + R,), generator=g)
            x = data["patches"][rows[:B]].to(dev)
            ids_new = exmask.trim_ids(data["ids"][rows[:B]], pad).to(dev)
            y = data["labels"][rows].clamp(max=model.n_classes - 1).to(dev)

            def part(r, k):   # rows r masked to k random patches, in collate's layout
                idx = torch.rand(len(r), N, generator=g).argsort(1)[:, :k].sort(1).values.to(dev)
                ids = exmask.trim_ids(data["ids"][r], pad).to(dev)
                return {"pixels": M.gather_tokens(data["patches"][r].to(dev), idx), "patch_idx": idx, "ids": ids,
                        "pos": torch.arange(ids.shape[1], device=dev).expand_as(ids),
                        "labels": data["labels"][r].clamp(max=model.n_classes - 1).to(dev)}
            # the masked new views and the replayed exemplars in one pass, as replay.masked_and_replay
            j = exmask.concat([b for b in (part(rows[:Bm], K), part(rows[B:], Kr)) if len(b["labels"])], pad) \
                if Bm or R else None

            def step():
                with amp:
                    loss = F.cross_entropy(model.forward_tokens(x, M.all_patches(x), ids_new).float(), y[:B])
                    if j is not None:
                        lo = F.cross_entropy(model.forward_tokens(j["pixels"], j["patch_idx"], j["ids"], j["pos"],
                                                                  j.get("patch_keep")).float(), j["labels"])
                        loss = (loss * B + lo * (Bm + R)) / (B + Bm + R)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with M.loop_attention(dev):   # the SDPA kernels the loop runs with
                step_ms[key] = clock(step, o.steps or 10, 3, cuda)["ms"], ids_new.shape[1]
        steps = cfg.epochs * per_epoch
        ms, cols = step_ms[key]
        alone_s += steps * ms / 1e3
        shapes.append({"phase": t + 1, "steps": steps, "exemplars": n_mem, "new_per_step": B, "new_masked_per_step": Bm,
                       "replayed_per_step": R, "replayed_patches": Kr, "masked_patches": K,
                       "caption_columns": int(cols), "step_ms": ms})
    out = {"device": dev, "device_name": torch.cuda.get_device_name() if cuda else None,
           "vit": {k: getattr(mcfg.vit, k) for k in ("image_size", "patch_size", "dim", "depth", "heads")},
           "compile": o.compile, "replay_passes": cfg.replay_passes, "loop_sdpa": M.LOOP_SDPA, "threads": torch.get_num_threads(), "images": len(data["labels"]),
           "phase_loop_s": loop_s, "phase_seconds": res["phase_seconds"], **{f"{k}_s": v for k, v in spent.items()},
           "memory_mean_kept_patches": [m["mean_kept_patches"] for m in res["memory_per_phase"]],
           "steps_alone_s": alone_s, "share_of_step_speed": alone_s / loop_s,
           "training_share_of_step_speed": alone_s / (spent["train_phase"] - spent["mask_sets"]), "phases": shapes,
           "avg_incremental_accuracy": res["avg_incremental_accuracy"]}
    print(f"phase_loop on {out['device_name'] or 'cpu'}: loop {loop_s:.1f}s (train {spent['train_phase']:.1f}s, "
          f"{spent['mask_sets']:.1f}s of it masking the new rows, "
          f"exemplars {spent['candidates']:.1f}s, head step {spent['balanced_head']:.1f}s, eval {spent['evaluate']:.1f}s); "
          f"steps alone {alone_s:.1f}s "
          f"-> {out['share_of_step_speed']:.0%} of step speed ({out['training_share_of_step_speed']:.0%} in the training "
          f"steps)",
          flush=True)
    return out


def sdpa_shapes(o) -> dict:
    """What a new shape costs: one training step of the phase loop's kind (our ViT with SSF and a
    head, bf16 on cuda: 32 new rows whole, 32 masked and 31 replayed at 10 % of the patches), first
    30 steps of one shape, then 30 of shapes drawn as the loop's vary (masked and replayed patches
    7.5-12.5 % of them, replayed rows 26-34), then those 30 again; with SDPA's kernels left to PyTorch and under
    models.loop_attention (LOOP_SDPA). ms per step. cuda: ViT-B/16 at 224 px; cpu: ViT-Ti/16 at 64
    px (or --vit, random weights)."""
    import random
    import timm
    dev, cuda = o.device, o.device.startswith("cuda")
    torch.set_num_threads(o.threads or torch.get_num_threads())
    name, kw = (o.vit, {}) if o.vit else ("vit_base_patch16_224", {}) if cuda else ("vit_tiny_patch16_224", {"img_size": 64})
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, num_classes=0, **kw)
    vit = M.ViT(M.vit_config_from_timm(ref), "ssf")
    M.load_timm_vit(vit, ref.state_dict())
    vit, head = vit.to(dev), nn.Linear(vit.cfg.dim, 100).to(dev)
    for n, p in vit.named_parameters():
        p.requires_grad = "_ssf." in n
    opt = torch.optim.Adam([p for p in vit.parameters() if p.requires_grad] + list(head.parameters()), lr=1e-5,
                           foreach=True)
    N, P = vit.cfg.n_patches, 3 * vit.cfg.patch_size ** 2
    g = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, (256, N, P), dtype=torch.uint8, generator=g)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def part(B: int, K: int | None) -> tuple:
        x = pool[torch.randint(len(pool), (B,), generator=g)].to(dev)
        if K is None:
            return x, M.all_patches(x)
        idx = torch.rand(B, N, generator=g).argsort(1)[:, :K].sort(1).values.to(dev)    # (B, K)
        return M.gather_tokens(x, idx), idx

    def steps(shapes: list) -> float:
        sync()
        t = time.perf_counter()
        for B, Km, R, Kr in shapes:
            with M.autocast(dev):
                loss = sum(F.cross_entropy(head(vit(x, i)).float(), torch.randint(0, 100, (len(x),), device=dev))
                           for x, i in (part(B, None), part(B, Km), part(R, Kr)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()
        return (time.perf_counter() - t) / len(shapes) * 1e3

    n = o.steps or 30
    rng, K, lo, hi = random.Random(0), max(1, N // 10), max(1, 3 * N // 40), max(1, N // 8)   # 19, 14-24 of 196
    rows = []
    for kernels in ("pytorch", "loop_sdpa"):
        ctx = contextlib.nullcontext if kernels == "pytorch" else lambda: M.loop_attention(dev)
        new = [(32, rng.randint(lo, hi), rng.randint(26, 34), rng.randint(lo, hi)) for _ in range(n)]
        with ctx():
            steps([(32, K, 31, K)] * 3)
            rows.append({"kernels": kernels, "one_shape_ms": steps([(32, K, 31, K)] * n), "new_shapes_ms": steps(new),
                         "same_shapes_again_ms": steps(new)})
        print(f"  sdpa_shapes {kernels:<10} one shape {rows[-1]['one_shape_ms']:.1f} ms, new shapes "
              f"{rows[-1]['new_shapes_ms']:.1f} ms, again {rows[-1]['same_shapes_again_ms']:.1f} ms a step", flush=True)
    return {"device": dev, "device_name": torch.cuda.get_device_name() if cuda else None, "vit": name,
            "image_size": vit.cfg.image_size, "loop_sdpa": M.LOOP_SDPA, "steps": n, "rows": rows}


def show_profile(p: dict) -> None:
    """profile_split's line under its row: ms per call by kind, and the longest kernel (or its error)."""
    if "error" in p:
        print(f"    profile failed: {p['error']}", flush=True)
        return
    kinds = "  ".join(f"{k} {v:.1f} ms ({p['share_by_kind'][k]:.0%})" for k, v in p["ms_by_kind"].items())
    t = p["top"][0] if p["top"] else {"name": "", "ms": 0}
    print(f"    {p['clock']} {p['ms']:.1f} ms: {kinds}; longest {t['name'][:50]} {t['ms']:.1f} ms", flush=True)


def show_speed_row(r: dict | None) -> None:
    """One model_speed row as it is measured (None: the header), so a cut-off run still shows its rows."""
    if r is None:
        print(f"  {'':<32} {'patches':>7} {'ms':>9} {'img/s':>9} {'limit':>9} {'share':>6} {'vs':>6} "
              f"{'GiB':>6} {'1st s':>6}", flush=True)
        return
    vs = f"{r['speed_ratio']:.2f}x" if "speed_ratio" in r else ""
    gib = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else ""
    print(f"  {r['name']:<32} {r['patches']:>7} {r['ms']:>9.1f} {r['img_s']:>9.1f} {r['limit_img_s']:>9.1f} "
          f"{r['share_of_limit']:>6.0%} {vs:>6} {gib:>6} {r['first_call_s']:>6.1f}", flush=True)
