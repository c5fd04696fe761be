"""Benchmarks for exmask: one function per benchmark, each returning a JSON-able dict.

    python bench.py                                  # every benchmark but data_scale
    python bench.py --only onnx_latency --threads 1  # one of them
    python bench.py --only data_scale --scale-dir DIR   # start-up at 5,000 and 50,000 images (~9 GB in DIR)
    python bench.py --run runs/default/exmask        # a trained run instead of the default model
    python bench.py --only model_speed --device cuda --compile   # ViT-B/16 vs timm, steps, matmul limit
    python bench.py --only model_speed --only phase_loop --device cuda   # issue 9's GPU figures, one JSON

Results are printed and merged into the JSON file `--out` (default runs/bench.json) under
"results"/<name>, with the machine they ran on, so benchmarks can be run one at a time.

Adding one: write `def name(o: Opts) -> dict`, put it in BENCHMARKS, add any new knob to Opts.

Threads: torch.set_num_threads and ORT's intra-op threads are set to the same number (--threads;
0 = torch's default). On a VM whose vCPUs share fewer physical cores (the 2-vCPU sandbox this was
written on delivers about one core), PyTorch's OpenMP with 2 threads is ~200x slower than with 1;
compare with --threads 1 there.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import models as M

# the exports measured: keyword arguments of export.export_onnx. "dynamo" is the default (ORT's fused
# MultiHeadAttention); "portable" the same exporter with standard ONNX ops only; "torchscript" the old exporter
EXPORTS = {"dynamo": {"dynamo": True}, "portable": {"dynamo": True, "fused": False}, "torchscript": {"dynamo": False}}


@dataclass
class Opts:
    repeats: int = 50      # timed calls per measurement; the median is reported
    warmup: int = 5
    threads: int = 0       # 0 = torch's default (the physical cores); ORT gets the same number
    run: str = ""          # a trained method folder (train.py's <out>/<method>); "" = the default model
    batches: tuple = (1, 32)
    device: str = "cpu"    # model_speed: "cuda" measures ViT-B/16 at 224 px in bf16 autocast
    batch: int = 0         # model_speed: images per call (0 = 256 on cuda, 16 on cpu)
    steps: int = 0         # model_speed: timed calls per row after the warmup (0 = 10 on cuda, 3 on cpu)
    compile: bool = False  # model_speed: also the training steps under torch.compile(dynamic=True)
    vit: str = ""          # model_speed: a timm ViT name ("" = SPEED_VITS by device)
    data: str = ""         # mask_precision: a manifest with object masks; "" = the embedded data
    sizes: tuple = (5000, 50000)  # data_scale: manifest sizes (images)
    scale_dir: str = os.path.join(tempfile.gettempdir(), "exmask-scale")  # data_scale: manifests and caches
    scale_steps: int = 0   # data_scale: ViT-B/16 training steps after the largest warm start-up (0 = none)


# ----------------------------------------------------------------------------- helpers

def machine() -> dict:
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    try:   # model_speed needs no onnxruntime: a GPU box without it still runs it
        import onnxruntime as ort
    except ImportError:
        ort = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "onnxruntime": ort.__version__ if ort else None,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def timed(fns: dict, repeats: int, warmup: int, rounds: int = 5) -> dict[str, float]:
    """Median milliseconds per call of each function. The functions take turns in `rounds` blocks,
    so a drift in machine speed (a shared host) hits all of them alike; within a block one runtime
    runs alone, so one runtime's spinning worker threads do not slow the other's calls."""
    times = {k: [] for k in fns}
    per = max(1, repeats // rounds)
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(warmup):
                fn()
            for _ in range(per):
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def bench_model(o: Opts) -> tuple[M.TwoTower, str]:
    """The model to measure and where it comes from: a trained run (SSF merged), or the default
    ModelConfig with an untrained 100-class head (latency does not depend on the weights)."""
    if o.run:
        import export as E
        model, _ = E.load_model(o.run)
        return model, o.run
    torch.manual_seed(0)
    model = M.TwoTower(M.ModelConfig(), n_classes=100).eval()
    return M.merge_ssf(model), "default ModelConfig, untrained 100-class head"


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


# ----------------------------------------------------------------------------- benchmarks

def onnx_export(o: Opts) -> dict:
    """Export seconds (first call in this process, then a second) and model.onnx size, per export."""
    import export as E
    model, source = bench_model(o)
    n = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    res = {"model": source, "params_and_buffers": n, "fp32_weight_kb": 4 * n / 1024}
    with tempfile.TemporaryDirectory() as d:
        for name, kw in EXPORTS.items():
            path = os.path.join(d, f"{name}.onnx")
            secs = []
            for _ in range(2):
                t = time.perf_counter()
                E.export_onnx(model, path, **kw)
                secs.append(time.perf_counter() - t)
            res[name] = {"export_s_first": secs[0], "export_s_second": secs[1], "file_kb": os.path.getsize(path) / 1024}
    return res


def onnx_latency(o: Opts) -> dict:
    """ONNX Runtime (CPU provider) vs PyTorch eager on CPU: the same model (SSF merged), the same
    inputs, the same thread count; batch 1 and 32 at the full caption length. ORT runs the default
    export (dynamo, fused attention) at ORT_ENABLE_ALL; also shown: ORT_ENABLE_BASIC, the portable
    export (standard ops only), the TorchScript exporter's graph, and eager without merge_ssf (what
    the training code runs). ORT sessions are export.session's, as served."""
    import export as E
    model, source = bench_model(o)
    threads = o.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    L = model.cfg.text.context
    unmerged = M.TwoTower(model.cfg, model.n_classes).eval()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, kw in EXPORTS.items():
            E.export_onnx(model, os.path.join(d, f"{name}.onnx"), **kw)
        sess = {f"ort_{name}_{lvl}": E.session(os.path.join(d, f"{name}.onnx"), providers=["CPUExecutionProvider"],
                                               threads=threads, opt_level=lvl)
                for name, lvl in (("dynamo", "all"), ("dynamo", "basic"), ("portable", "all"), ("torchscript", "all"))}
        for B in o.batches:
            images, ids = E.example_inputs(model, B, L, seed=B)
            feeds = {"images": images.numpy(), "ids": ids.numpy()}
            fns = {"torch": lambda: model(images, ids), "torch_unmerged": lambda: unmerged(images, ids),
                   **{k: (lambda s=s: s.run(["logits"], feeds)) for k, s in sess.items()}}
            with torch.inference_mode():
                ms = timed(fns, o.repeats, o.warmup)
            row = {"batch": B, "length": L, **{f"{k}_ms": v for k, v in ms.items()}}
            row["ratio_ort_over_torch"] = ms["ort_dynamo_all"] / ms["torch"]
            row["ratio_ort_portable_over_torch"] = ms["ort_portable_all"] / ms["torch"]
            row["ratio_ort_torchscript_over_torch"] = ms["ort_torchscript_all"] / ms["torch"]
            row["max_abs_diff"] = E.compare(model, sess["ort_dynamo_all"], images, ids)["max_abs_diff"]
            rows.append(row)
    return {"model": source, "torch_threads": torch.get_num_threads(), "torch_interop_threads":
            torch.get_num_interop_threads(), "ort_intra_op_threads": threads, "ort_inter_op_threads": 1,
            "ort_providers": sess["ort_dynamo_all"].get_providers(), "repeats": o.repeats, "rows": rows}


def replay_cost(o: Opts) -> dict:
    """One training step (forward, backward, Adam) of the default SSF model on B replayed exemplars:
    masked (exmask's default shares: 30 % of patches, 80 % of caption words) vs full, per exemplar.
    Exemplars are built and batched by exmask.encode / exmask.collate, as in training."""
    import exmask
    threads = o.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    cfg = M.ModelConfig()
    torch.manual_seed(0)
    model = M.TwoTower(cfg, n_classes=100)
    model.freeze_backbone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    N, P, L, B = cfg.vit.n_patches, 3 * cfg.vit.patch_size ** 2, 12, 32     # 12 tokens: the default captions' mean
    K = exmask.keep_count(N, 0.3)

    def batch(masked: bool) -> dict:
        items = []
        for i in range(B):
            ids = torch.cat([torch.tensor([2]), torch.randint(4, cfg.text.vocab_size, (L - 2,), generator=g), torch.tensor([3])])
            keep = exmask.keep_text(torch.rand(1, L, generator=g), ids[None], 0, 0.8)[0] if masked else None
            idx = torch.randperm(N, generator=g)[:K].sort().values if masked else None
            items.append(exmask.encode(torch.randint(0, 256, (N, P), generator=g).to(torch.uint8), ids, i % 100,
                                       cfg.text.vocab_size, 0, idx=idx, keep=keep))
        return exmask.collate(items, 0)

    batches = {"full": batch(False), "masked": batch(True)}

    def step(r: dict) -> None:
        loss = torch.nn.functional.cross_entropy(model.forward_tokens(r["pixels"], r["patch_idx"], r["ids"], r["pos"]),
                                                 r["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ms = timed({k: (lambda r=r: step(r)) for k, r in batches.items()}, o.repeats, o.warmup)
    return {"threads": threads, "batch": B, "patches": {"full": N, "masked": K},
            "tokens": {k: int((r["ids"] != 0).sum(1).float().mean()) for k, r in batches.items()},
            "step_ms": ms, "ms_per_exemplar": {k: v / B for k, v in ms.items()},
            "ratio_masked_over_full": ms["masked"] / ms["full"], "repeats": o.repeats}


def mask_precision(o: Opts) -> dict:
    """How the patches each rule keeps (train.Config's share) relate to the object and to the full
    image, with the default pretrained towers (cached, or pretrained once), on up to 400 *training*
    rows (never the test rows) of the embedded data or of a manifest with object masks (--data, e.g.
    data.py icons):
    on_object: the share of kept patches that are at least half object; best possible: all object
    patches first. fidelity: the cosine between the image embedding of the kept patches and that of
    the full image (what a replayed exemplar looks like to the model, against the test images it
    will meet). Rules as in train.image_keep; "class" needs a trained head and is left out."""
    import exmask
    from towers import default_backbone
    from train import Config, console, draw_noise, image_keep, read_data
    torch.set_num_threads(o.threads or torch.get_num_threads())
    cfg = Config(quiet=True, data=o.data, device="cpu")
    mcfg, state, _ = default_backbone(cfg, "cpu", console(cfg))
    model = M.TwoTower(mcfg, 1).eval()
    model.load_state_dict(state, strict=False)
    raw = read_data(cfg, mcfg.vit.image_size)
    if "objects" not in raw:
        raise SystemExit(f"error: {o.data} has no object masks (a `mask` column)")
    rows = raw["is_train"].nonzero().flatten()
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:400]]
    p = mcfg.vit.patch_size
    x = M.patchify(raw["images"][rows], p)                                          # (n, N, 3*p*p)
    obj = M.patchify(raw["objects"][rows][:, None], p).float().mean(-1) / 255         # (n, N)
    on_obj = (obj >= 0.5).float()
    ids = torch.zeros(len(rows), 2, dtype=torch.long)                                # the image rules ignore text
    N = x.shape[1]
    K = exmask.keep_count(N, cfg.keep_image)
    res = {"data": o.data or "embedded", "rows": len(rows), "kept_patches": K,
           "object_share_of_patches": on_obj.mean().item(), "rules": {}}
    with torch.no_grad():
        full, (row, _) = model.image(x, M.all_patches(x), aux=True)
        for rule in ("paper", "attn", "spread", "sample", "feature", "random", "object"):
            noise = draw_noise(len(rows), N, 2, torch.Generator().manual_seed(0))["image"]
            idx = image_keep(model, x, ids, row, rule, cfg, noise, objects=obj)
            emb = model.image(M.gather_tokens(x, idx), idx)
            res["rules"][rule] = {"on_object": on_obj.gather(1, idx).mean().item(),
                                  "fidelity": torch.nn.functional.cosine_similarity(emb, full, dim=-1).mean().item()}
    res["best_possible_on_object"] = res["rules"]["object"]["on_object"]
    return res


# models.SSF_TRAIN's paths, as model_speed's rows note them
SSF_PATHS = {"function": "LinearSSF: one matmul, no weight-gradient matmul, one fused reduction per Linear",
             "fold": "SSF folded into Linear weights while training (weight-gradient matmuls)",
             "addcmul": "addcmul after each Linear (activation-sized passes)"}


@contextlib.contextmanager
def ssf_train(mode: str):
    """models.SSF_TRAIN = mode inside, restored after."""
    old, M.SSF_TRAIN = M.SSF_TRAIN, mode
    try:
        yield
    finally:
        M.SSF_TRAIN = old


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


def model_speed(o: Opts) -> dict:
    """Our ViT against timm's VisionTransformer with the same weights, on o.device (bf16 autocast
    on cuda, fp32 on cpu), B images per call: inference img/s; a training step (forward, backward,
    Adam) with a linear head of 100 classes: ours with SSF (the default adapter) vs timm with only
    the LayerNorms trained (the same matmuls: frozen weights, activation gradients), ours with the
    LayerNorms trained (the implementation alone), ours with SSF on each of models.SSF_TRAIN's paths
    ("step ours SSF" is the default, "function"; then "fold" and "addcmul"), with prompts, and masked
    (25 % and 50 % of patches kept); with --compile the SSF and timm steps again under
    torch.compile(dynamic=True), as train.py --compile runs. Before the rows, ssf_grad_check.
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
        r["img_s"] = B / r["ms"] * 1e3
        fwd, stp = vit_flops(cfg, patches, C)
        r["limit_img_s"] = rate["tflops"] * 1e12 / (fwd if kind == "inference" else stp)
        r["share_of_limit"] = r["img_s"] / r["limit_img_s"]
        if ref_row:
            r["vs"], r["speed_ratio"] = ref_row, r["img_s"] / next(x["img_s"] for x in rows if x["name"] == ref_row)
        r["note"] = note
        rows.append(r)
        show_speed_row(r)

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

    # (b), (d) compiled, as train.py --compile (dynamic shapes: one graph for every kept count)
    if o.compile:
        ctimm = torch.compile(ref, dynamic=True)
        measure("compiled step timm LN", "step", N, step(lambda im: ctimm((im - mean) / std), timm_params, (images,)),
                "step timm LN", "first_call_s includes compiling")
        cvit = torch.compile(ssf_vit, dynamic=True)
        cfwd = lambda p, i: ssf_head(cvit(p, i))
        measure("compiled step ours SSF", "step", N, step(cfwd, ssf_params, full), "compiled step timm LN",
                SSF_PATHS[M.SSF_COMPILED] + " (the default path under torch.compile)")
        with ssf_train("fold"):   # dynamo guards on SSF_TRAIN: each path compiles once
            measure("compiled step ours SSF fold", "step", N, step(cfwd, ssf_params, full), "compiled step timm LN",
                    SSF_PATHS["fold"])
        for share in (0.5, 0.25):
            K = exmask.keep_count(N, share)
            measure(f"compiled step ours SSF keep {share:.0%}", "step", K, step(cfwd, ssf_params, kept(K)),
                    "compiled step ours SSF")

    return {"device": dev, "device_name": torch.cuda.get_device_name() if cuda else None, "timm_model": name,
            "timm_kwargs": kw, "vit": {k: getattr(cfg, k) for k in ("image_size", "patch_size", "dim", "depth", "heads")},
            "batch": B, "classes": C, "autocast": "bf16" if cuda else None, "steps_timed": steps, "warmup": 2,
            "threads": torch.get_num_threads(), "compile": o.compile, "matmul": rate,
            "gflop_per_img": {"forward": fwd / 1e9, "step": stp / 1e9}, "max_abs_diff_ours_vs_timm": diff,
            "ssf_train_default": M.SSF_TRAIN, "ssf_grad_rel_err": grad_check, "rows": rows}


def phase_loop(o: Opts, base=None) -> dict:
    """The phase loop against its own steps: `train.run_method` for exmask (10 phases of 10 classes,
    3 epochs, batch 32, the default settings) with the time spent in training, in choosing and masking
    exemplars and in evaluation measured apart; then every step the loop took, timed alone (the same
    model, batch shapes and replay size, warm, synchronised). share = steps alone / whole phase loop.
    cpu: the default towers on the embedded data (python train.py's run); cuda: a randomly initialised
    timm ViT-B/16 (or --vit) at 224 px with the default text tower, on the embedded data's 6,000
    image-caption pairs upsampled to 224 px, bf16 autocast; --compile: train.py --compile; --vit: that
    timm ViT (random weights) on any device. `base`: a train.Config to start from (tests)."""
    import timm
    import data as D
    import exmask
    import train as T
    from towers import default_backbone
    dev, cuda = o.device, o.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.set_num_threads(o.threads or torch.get_num_threads())
    cfg = replace(base or T.Config(), device=dev, quiet=True, export=False, compile=o.compile, out=tempfile.mkdtemp())
    mcfg, state, tok = default_backbone(cfg, dev, T.console(cfg))
    raw = D.make_synth(cfg.synth)
    if cuda or o.vit:   # a real-scale image tower, random weights (speed does not depend on them)
        torch.manual_seed(0)
        ref = timm.create_model(o.vit or "vit_base_patch16_224", pretrained=False, num_classes=0)
        vit = M.ViT(M.vit_config_from_timm(ref))
        M.load_timm_vit(vit, ref.state_dict())
        mcfg = replace(mcfg, vit=vit.cfg)
        state = {k: v for k, v in state.items() if not k.startswith("image.")} | {f"image.{k}": v
                                                                                  for k, v in vit.state_dict().items()}
        S = vit.cfg.image_size
        raw["images"] = F.interpolate(raw["images"].float(), size=(S, S), mode="nearest").to(torch.uint8)
    raw["is_train"] = ~raw["is_test"]
    data = T.prepare(raw, cfg, mcfg, tok)

    spent = {"train_phase": 0.0, "candidates": 0.0, "evaluate": 0.0}
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

    # every step again, alone: the same shapes (new batch, replayed exemplars at the kept share)
    phase_cls = D.phase_classes(list(range(len(data["class_names"]))), cfg.phases)
    N, P = data["patches"].shape[1:]
    K = exmask.keep_count(N, cfg.keep_image)
    g = torch.Generator().manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-5)
    amp = T.autocast(dev)
    model.train()
    step_ms, alone_s, shapes = {}, 0.0, []
    for t in range(cfg.phases):
        n_new = int((data["is_train"] & torch.isin(data["labels"], torch.tensor(phase_cls[t]))).sum())
        n_mem = res["memory_per_phase"][t - 1]["exemplars"] if t else 0
        per_epoch, B, R = T.epoch_plan(n_new, n_mem, cfg.batch_size)
        if (B, R) not in step_ms:
            rows = torch.randint(len(data["labels"]), (B + R,), generator=g)
            x = data["patches"][rows[:B]].to(dev)
            pidx = torch.rand(R, N, generator=g).argsort(1)[:, :K].sort(1).values.to(dev)
            xr = M.gather_tokens(data["patches"][rows[B:]].to(dev), pidx)
            ids = data["ids"][rows].to(dev)
            y = data["labels"][rows].clamp(max=model.n_classes - 1).to(dev)

            def step():
                with amp:
                    loss = F.cross_entropy(model.forward_tokens(x, M.all_patches(x), ids[:B]).float(), y[:B])
                    if R:
                        lr_ = F.cross_entropy(model.forward_tokens(xr, pidx, ids[B:]).float(), y[B:])
                        loss = (loss * B + lr_ * R) / (B + R)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            step_ms[(B, R)] = clock(step, o.steps or 10, 3, cuda)["ms"]
        steps = cfg.epochs * per_epoch
        alone_s += steps * step_ms[(B, R)] / 1e3
        shapes.append({"phase": t + 1, "steps": steps, "new_per_step": B, "replayed_per_step": R,
                       "step_ms": step_ms[(B, R)]})
    out = {"device": dev, "device_name": torch.cuda.get_device_name() if cuda else None,
           "vit": {k: getattr(mcfg.vit, k) for k in ("image_size", "patch_size", "dim", "depth", "heads")},
           "compile": o.compile, "threads": torch.get_num_threads(), "images": len(data["labels"]),
           "phase_loop_s": loop_s, "phase_seconds": res["phase_seconds"], **{f"{k}_s": v for k, v in spent.items()},
           "steps_alone_s": alone_s, "share_of_step_speed": alone_s / loop_s,
           "training_share_of_step_speed": alone_s / spent["train_phase"], "phases": shapes,
           "avg_incremental_accuracy": res["avg_incremental_accuracy"]}
    print(f"phase_loop on {out['device_name'] or 'cpu'}: loop {loop_s:.1f}s (train {spent['train_phase']:.1f}s, "
          f"exemplars {spent['candidates']:.1f}s, eval {spent['evaluate']:.1f}s); steps alone {alone_s:.1f}s "
          f"-> {out['share_of_step_speed']:.0%} of step speed ({out['training_share_of_step_speed']:.0%} in training)",
          flush=True)
    return out


def tree_memory() -> dict[str, int]:
    """Proportional memory (bytes) of this process and its children (the decode workers), from
    /proc: pss (everything, shared pages split between their users), anon (what must fit in RAM;
    the rest is file pages, such as the image cache's, that the kernel can drop and read again)."""
    me = os.getpid()
    pids = [me]
    for t in os.listdir(f"/proc/{me}/task"):
        try:
            with open(f"/proc/{me}/task/{t}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    out = {"pss": 0, "anon": 0}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                kb = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in f if ln[0].isupper())}
        except (OSError, ValueError):
            continue   # a worker that just ended
        out["pss"] += kb.get("Pss", 0) * 1024
        out["anon"] += kb.get("Pss_Anon", 0) * 1024
    return out


def data_startup(manifest: str, cache_dir: str, threads: int = 0, steps: int = 0, image_size: int = 224,
                 patch: int = 16, dims: tuple = (768, 12, 12), reads: int = 5) -> dict:
    """What train.py does with a manifest before its first step, in this process: read_data (the
    manifest, the image cache: built or opened) and prepare (token ids, the patch view), with a ViT
    of `dims` (dim, depth, heads: ViT-B/16 by default) at `image_size` px; then `reads` batches of 32
    random rows cut from the view, and `steps` SSF training steps of that ViT (random weights: memory
    and time are the same) on such batches. Peak memory sampled every 0.1 s (tree_memory) and the
    process's peak RSS."""
    import resource
    import threading

    import data as D
    from train import Config, prepare, read_data
    if threads:
        torch.set_num_threads(threads)
    peak = {"pss": 0, "anon": 0}
    stop = threading.Event()

    def note():
        for k, v in tree_memory().items():
            peak[k] = max(peak[k], v)

    def sample():
        while not stop.is_set():
            note()
            stop.wait(0.1)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    mib = lambda b: b / 2 ** 20
    res = {"imported_pss_mib": mib(tree_memory()["pss"])}
    cfg = Config(data=manifest, cache_dir=cache_dir, quiet=True)
    res["cache_existed"] = os.path.isdir(os.path.join(cache_dir, "images"))
    cpu = lambda: sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                                 resource.RUSAGE_CHILDREN)))
    cpu0, t = cpu(), time.perf_counter()
    raw = read_data(cfg, image_size)
    res["read_data_s"] = time.perf_counter() - t
    tok = D.SPTokenizer.train(raw["texts"][:2000], 400)   # train.py's comes with the towers: not timed
    vit = M.ViTConfig(image_size=image_size, patch_size=patch, dim=dims[0], depth=dims[1], heads=dims[2])
    mcfg = M.ModelConfig(vit=vit, text=M.TextConfig(vocab_size=tok.vocab_size))
    t = time.perf_counter()
    data = prepare(raw, cfg, mcfg, tok)
    res["prepare_s"] = time.perf_counter() - t
    res["startup_s"] = res["read_data_s"] + res["prepare_s"]
    res["startup_cpu_s"] = cpu() - cpu0          # this process and its decode workers: less noisy on a shared host
    N = len(data["labels"])
    g = torch.Generator().manual_seed(0)
    ms = []
    for _ in range(reads):
        b = torch.randperm(N, generator=g)[:32]
        t = time.perf_counter()
        x = data["patches"][b]                                                  # (32, n_patches, 3*p*p) uint8
        ms.append(1e3 * (time.perf_counter() - t))
    res["batch32_ms"], res["batch32_ms_first"] = statistics.median(ms), ms[0]
    note()
    res["startup_peak_pss_mib"], res["startup_peak_anon_mib"] = mib(peak["pss"]), mib(peak["anon"])
    if steps:
        model = M.TwoTower(mcfg, len(data["class_names"]))
        model.freeze_backbone()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        t = time.perf_counter()
        for _ in range(steps):
            b = torch.randperm(N, generator=g)[:32]
            x = data["patches"][b]
            loss = F.cross_entropy(model.forward_tokens(x, M.all_patches(x), data["ids"][b]), data["labels"][b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        res["train_steps"], res["train_step_s"] = steps, (time.perf_counter() - t) / steps
    stop.set()
    sampler.join()
    note()
    res["peak_pss_mib"], res["peak_anon_mib"] = mib(peak["pss"]), mib(peak["anon"])
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    res["images"], res["cache_gib"] = N, raw["images"].numel() / 2 ** 30
    return res


def data_scale(o: Opts) -> dict:
    """Data at scale: for each size in o.sizes, a generated manifest of 224 px JPEGs (data.make_fake,
    under o.scale_dir, reused when there), then in a fresh process (data_startup) train.py's start-up
    on it twice: cold (no image cache: it is built) and warm (a cache hit). Wall seconds, peak memory,
    ms per batch of 32 random rows; with --scale-steps, training steps of a ViT-B/16 after the largest
    manifest's warm start-up (does a 224-px run fit in RAM?)."""
    import shutil
    import subprocess
    import sys

    import data as D
    here = os.path.dirname(os.path.abspath(__file__))
    res = {"image_size": 224, "scale_dir": o.scale_dir, "rows": []}
    for n in o.sizes:
        folder = os.path.join(o.scale_dir, f"fake-{n}")
        manifest = os.path.join(folder, "manifest.csv")
        row = {"images": n}
        if not os.path.exists(manifest):
            t = time.perf_counter()
            D.make_fake(folder, n)
            row["generate_s"] = time.perf_counter() - t
        row["jpeg_mib"] = sum(e.stat().st_size for d in os.scandir(os.path.join(folder, "images"))
                              for e in os.scandir(d)) / 2 ** 20
        cache = os.path.join(o.scale_dir, f"cache-{n}")
        shutil.rmtree(cache, ignore_errors=True)
        for run in ("cold", "warm"):
            steps = o.scale_steps if run == "warm" and n == max(o.sizes) else 0
            code = (f"import json, bench; r = bench.data_startup({manifest!r}, {cache!r}, {o.threads}, {steps}); "
                    "print('RESULT', json.dumps(r))")
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True, check=False)
            if p.returncode:
                raise SystemExit(f"error: data_startup on {manifest} failed:\n{p.stderr[-2000:]}")
            r = json.loads(p.stdout.rsplit("RESULT ", 1)[1])
            r["process_s"] = time.perf_counter() - t                    # with the interpreter and torch import
            row[run] = r
            print(f"  {n:,} images, {run}: start-up {r['startup_s']:.1f}s, peak {r['startup_peak_pss_mib']:,.0f} MiB "
                  f"({r['startup_peak_anon_mib']:,.0f} MiB anonymous), batch of 32 {r['batch32_ms']:.1f} ms", flush=True)
        res["rows"].append(row)
    return res


BENCHMARKS = {"onnx_export": onnx_export, "onnx_latency": onnx_latency, "replay_cost": replay_cost,
              "mask_precision": mask_precision, "model_speed": model_speed, "phase_loop": phase_loop,
              "data_scale": data_scale}


# ----------------------------------------------------------------------------- report

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


def show(name: str, res: dict) -> None:
    if name == "onnx_latency":
        print(f"onnx_latency ({res['model']}; torch threads {res['torch_threads']}, "
              f"ORT intra-op threads {res['ort_intra_op_threads']}, median ms of {res['repeats']})")
        cols = ("torch", "ort_dynamo_all", "ratio_ort_over_torch", "ort_dynamo_basic", "ort_portable_all",
                "ratio_ort_portable_over_torch", "ort_torchscript_all", "ratio_ort_torchscript_over_torch",
                "torch_unmerged")
        heads = ("torch", "ORT", "ORT/torch", "ORT basic", "ORT(std)", "ORT(std)/torch", "ORT(TS)", "ORT(TS)/torch",
                 "torch unmerged")
        print(f"{'batch':>5} " + " ".join(f"{h:>{max(9, len(h))}}" for h in heads) + f" {'max|diff|':>9}")
        for r in res["rows"]:
            vals = [r.get(f"{c}_ms", r.get(c)) for c in cols]
            print(f"{r['batch']:>5} " + " ".join(f"{v:>{max(9, len(h))}.{2 if 'ratio' in c else 3}f}"
                                                 for v, h, c in zip(vals, heads, cols)) + f" {r['max_abs_diff']:>9.1e}")
    elif name == "onnx_export":
        print(f"onnx_export ({res['model']}; {res['fp32_weight_kb']:,.0f} KB of fp32 weights)")
        for ex in EXPORTS:
            r = res[ex]
            print(f"  {ex:>11}: {r['export_s_first']:.2f}s first call, {r['export_s_second']:.2f}s second, "
                  f"{r['file_kb']:,.0f} KB")
    elif name == "replay_cost":
        print(f"replay_cost (one SSF training step on {res['batch']} exemplars, torch threads {res['threads']}, "
              f"median of {res['repeats']})")
        for k in ("full", "masked"):
            print(f"  {k:>6}: {res['patches'][k]} patches, {res['tokens'][k]} tokens: {res['step_ms'][k]:.1f} ms/step, "
                  f"{res['ms_per_exemplar'][k]:.3f} ms/exemplar")
        print(f"  masked / full: {res['ratio_masked_over_full']:.2f}")
    elif name == "model_speed":
        print(f"  (vs: img/s over the row named in the JSON's 'vs'; share: of the matmul-rate limit; "
              f"ours vs timm max |diff| {res['max_abs_diff_ours_vs_timm']:.1e})")
    elif name == "phase_loop":
        print(f"  {'phase':>5} {'steps':>5} {'new':>4} {'replayed':>8} {'ms/step':>8}   (each step alone)")
        for r in res["phases"]:
            print(f"  {r['phase']:>5} {r['steps']:>5} {r['new_per_step']:>4} {r['replayed_per_step']:>8} {r['step_ms']:>8.1f}")
    elif name == "mask_precision":
        print(f"mask_precision ({res['data']}, {res['rows']} training rows, {res['kept_patches']} patches kept; "
              f"{100 * res['object_share_of_patches']:.0f} % of all patches are object)")
        print(f"  {'rule':>8} {'on object':>10} {'fidelity':>9}")
        for rule, r in res["rules"].items():
            print(f"  {rule:>8} {100 * r['on_object']:>9.1f}% {r['fidelity']:>9.3f}")
    elif name == "data_scale":
        steps = [(row["images"], row["warm"]) for row in res["rows"] if "train_steps" in row["warm"]]
        print(f"data_scale ({res['image_size']} px; start-up = read_data + prepare; peak: proportional memory of "
              f"the process and its decode workers, anonymous = what must fit in RAM)")
        print(f"  {'images':>8} {'cache GiB':>9} {'run':>5} {'start-up s':>10} {'CPU s':>7} {'process s':>9} {'peak MiB':>9} "
              f"{'anon MiB':>9} {'batch ms':>8}")
        for row in res["rows"]:
            for run in ("cold", "warm"):
                r = row[run]
                print(f"  {row['images']:>8,} {r['cache_gib']:>9.2f} {run:>5} {r['startup_s']:>10.1f} {r['startup_cpu_s']:>7.1f} "
                      f"{r['process_s']:>9.1f} {r['startup_peak_pss_mib']:>9,.0f} {r['startup_peak_anon_mib']:>9,.0f} "
                      f"{r['batch32_ms']:>8.1f}")
        for n, r in steps:
            print(f"  then {r['train_steps']} ViT-B/16 SSF training steps of 32 images on the {n:,}: {r['train_step_s']:.1f} s "
                  f"a step, peak {r['peak_pss_mib']:,.0f} MiB ({r['peak_anon_mib']:,.0f} MiB anonymous)")
    else:
        print(name, json.dumps(res, indent=1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    o = Opts()
    p.add_argument("--only", choices=sorted(BENCHMARKS), action="append", help="run only this one (repeatable)")
    p.add_argument("--out", default=os.path.join("runs", "bench.json"))
    p.add_argument("--repeats", type=int, default=o.repeats)
    p.add_argument("--warmup", type=int, default=o.warmup)
    p.add_argument("--threads", type=int, default=o.threads)
    p.add_argument("--run", default=o.run, help="a trained method folder instead of the default model")
    p.add_argument("--device", default=o.device, help="model_speed: cpu or cuda")
    p.add_argument("--batch", type=int, default=o.batch, help="model_speed: images per call (0 = 256 cuda, 16 cpu)")
    p.add_argument("--steps", type=int, default=o.steps, help="model_speed: timed calls per row (0 = 10 cuda, 3 cpu)")
    p.add_argument("--compile", action="store_true", help="model_speed: also the compiled training steps")
    p.add_argument("--vit", default=o.vit, help="model_speed: a timm ViT name instead of SPEED_VITS")
    p.add_argument("--data", default=o.data, help="mask_precision: a manifest with object masks (default: embedded)")
    p.add_argument("--sizes", default=",".join(map(str, o.sizes)), help="data_scale: manifest sizes, comma-separated")
    p.add_argument("--scale-dir", default=o.scale_dir, help="data_scale: where the manifests and caches go (GBs)")
    p.add_argument("--scale-steps", type=int, default=o.scale_steps, help="data_scale: ViT-B/16 training steps after start-up")
    a = p.parse_args(argv)
    opts = Opts(repeats=a.repeats, warmup=a.warmup, threads=a.threads, run=a.run, device=a.device, batch=a.batch,
                steps=a.steps, compile=a.compile, vit=a.vit, data=a.data, sizes=tuple(int(x) for x in a.sizes.split(",")),
                scale_dir=a.scale_dir, scale_steps=a.scale_steps)
    report = {"results": {}}
    if os.path.exists(a.out):
        with open(a.out) as f:
            report = json.load(f)
    report["machine"] = machine()
    for name in a.only or [n for n in BENCHMARKS if n != "data_scale"]:   # it writes gigabytes: ask for it
        res = BENCHMARKS[name](opts)
        report["results"][name] = res
        show(name, res)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(a.out + ".tmp", a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
