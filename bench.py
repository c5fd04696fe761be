"""Benchmarks for exmask: one function per benchmark, each returning a JSON-able dict.

    python bench.py                                  # every benchmark but data_scale (masked_test: with --run)
    python bench.py --only onnx_latency --threads 1  # one of them
    python bench.py --only data_scale --scale-dir DIR   # start-up at 5,000 and 50,000 images (~9 GB in DIR)
    python bench.py --run runs/default/exmask        # onnx_export, onnx_latency, masked_test on a trained run
    python bench.py --only masked_test --run RUN/exmask [--data D]   # has the run learned "masked = old class"?
    # issue 9's GPU figures, three runs into one JSON (each run adds its results to F):
    python bench.py --only model_speed --compile --profile --device cuda --out F   # ViT-B/16 vs timm, steps,
                                                     # matmul limit, each row's time by kernel kind
    python bench.py --only sdpa_shapes --device cuda --out F   # a step of new shapes, with and without cuDNN attention
    python bench.py --only phase_loop --device cuda --out F    # the phase loop against its own steps

Results are printed and merged into the JSON file `--out` (default runs/bench.json) under
"results"/<name>, each with the machine it ran on ("results"/<name>/"machine"; the top-level
"machine" is the last run's), so benchmarks can be run one at a time, on different machines.

Adding one: write `def name(o: Opts) -> dict`, put it in BENCHMARKS, add any new knob to Opts. The
speed benchmarks (model_speed, phase_loop, sdpa_shapes) live in bench_speed.py, data_scale in bench_data.py.

Threads: torch.set_num_threads and ORT's intra-op threads are set to the same number (--threads;
0 = torch's default). On a VM whose vCPUs share fewer physical cores (the 2-vCPU sandbox this was
written on delivers about one core), PyTorch's OpenMP with 2 threads is ~200x slower than with 1;
compare with --threads 1 there.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

import data as D
import models as M
from bench_data import data_scale
from bench_speed import model_speed, phase_loop, sdpa_shapes

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
    compile: bool = False  # model_speed: also the compiled steps (models.compiled); phase_loop: train.py --compile
    replay_passes: int = 1  # phase_loop: train.py --replay-passes
    profile: bool = False  # model_speed: each row's time by kernel kind (bench_speed.profile_split)
    vit: str = ""          # model_speed: a timm ViT name ("" = SPEED_VITS by device)
    data: str = ""         # mask_precision (a manifest with object masks), masked_test; "" = the embedded data
    keep_image: float = 0.0  # mask_precision: the share of patches kept (0 = train.Config's default)
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
    """Median milliseconds of `repeats` timed calls of each function. The functions take turns in
    `rounds` blocks (fewer where repeats < rounds), the calls spread over them as evenly as they go,
    so a drift in machine speed (a shared host) hits all of them alike; within a block one runtime
    runs alone, after `warmup` untimed calls, so one runtime's spinning worker threads do not slow
    the other's calls."""
    times = {k: [] for k in fns}
    rounds = max(1, min(rounds, repeats))
    for r in range(rounds):
        per = repeats // rounds + (r < repeats % rounds)
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
    masked (30 % of patches, 80 % of caption words: the shares of an earlier default) vs full, per exemplar.
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
    """How the patches each rule keeps (o.keep_image, or train.Config's share) relate to the object and to the full
    image, with the default pretrained towers (cached, or pretrained once), on up to 400 *training*
    rows (never the test rows) of the embedded data or of a manifest with object masks (--data, e.g.
    data.py icons):
    on_object: the share of kept patches that are at least half object; best possible: all object
    patches first. fidelity: the cosine between the image embedding of the kept patches and that of
    the full image (what a replayed exemplar looks like to the model, against the test images it
    will meet). Rules as in exemplars.image_keep; "class" needs a trained head and is left out."""
    import exmask
    from towers import default_backbone
    from exemplars import draw_noise, image_keep
    from train import Config, console, read_data
    torch.set_num_threads(o.threads or torch.get_num_threads())
    cfg = Config(quiet=True, data=o.data, device="cpu", keep_image=o.keep_image or Config().keep_image)
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


@torch.no_grad()
def masked_test(o: Opts) -> dict:
    """Has a trained run (--run: train.py's <out>/<method>, on the default towers) learned that a
    masked image means an old class? Its test rows of --data (the embedded data by default), each
    image whole and shown as a masked exemplar would be (K random patches: the run's share and
    twice it): accuracy on the classes of the phases before the last ("old") and of the last phase,
    and the share of old classes' rows it puts in a last-phase class. Old exemplars are replayed
    masked and new rows seen whole, so a model that took that cue scores its old classes well
    masked, badly whole, and sends their whole test images to the newest classes."""
    import exmask
    from export import load_model
    from towers import default_backbone
    from train import Config, Patches, console, read_data
    if not o.run:
        raise SystemExit("error: masked_test needs --run, a trained method folder (train.py's <out>/<method>)")
    torch.set_num_threads(o.threads or torch.get_num_threads())
    model, names = load_model(o.run)
    cfg = Config(quiet=True, data=o.data, device="cpu")
    mcfg, _, tok = default_backbone(cfg, "cpu", console(cfg))
    if model.cfg.vit != mcfg.vit or model.cfg.text.context != mcfg.text.context:
        raise SystemExit("error: masked_test reads runs on the default towers (their tokenizer and image size)")
    tok = D.load_tokenizer(o.run) if any(os.path.exists(os.path.join(o.run, f)) for f in D.TOKENIZER_FILES) else tok
    ck = torch.load(os.path.join(o.run, "checkpoint.pt"), map_location="cpu", weights_only=True)
    per_phase, share = ck["classes_per_phase"], ck.get("run", {}).get("keep_image", cfg.keep_image)   # the run's own share
    raw = read_data(cfg, mcfg.vit.image_size)
    where = {n: i for i, n in enumerate(names)}
    if set(raw["class_names"]) != set(where):
        raise SystemExit(f"error: {o.run} was trained on other classes than those of {o.data or 'the embedded data'}")
    label = torch.tensor([where[n] for n in raw["class_names"]])[raw["labels"]]       # the run's class index
    te = raw["is_test"].nonzero().flatten()
    patches, ids = Patches(raw["images"], mcfg.vit.patch_size), D.encode_texts(tok, raw["texts"], mcfg.text.context)
    N, first_new = patches.shape[1], len(names) - per_phase[-1]
    K0 = exmask.keep_count(N, share)
    gen = torch.Generator().manual_seed(0)
    res = {"data": o.data or "embedded", "run": o.run, "test_rows": len(te), "last_phase_classes": per_phase[-1], "rows": []}
    for K in (N, K0, 2 * K0):
        pred = []
        for b in te.split(256):
            x = patches[b]
            idx = M.all_patches(x) if K == N else exmask.keep_top(torch.rand(len(b), N, generator=gen), K)
            pred.append(model.forward_tokens(M.gather_tokens(x, idx), idx, exmask.trim_ids(ids[b], mcfg.text.pad_id)).argmax(1))
        pred, y = torch.cat(pred), label[te]
        old = y < first_new
        res["rows"].append({"kept_patches": K, "old_class_accuracy": 100 * (pred == y)[old].float().mean().item(),
                            "last_phase_accuracy": 100 * (pred == y)[~old].float().mean().item(),
                            "old_rows_put_in_last_phase": 100 * (pred[old] >= first_new).float().mean().item()})
    return res


USE_RUN = ("onnx_export", "onnx_latency", "masked_test")   # the benchmarks that measure --run's model
BENCHMARKS = {"onnx_export": onnx_export, "onnx_latency": onnx_latency, "replay_cost": replay_cost,
              "mask_precision": mask_precision, "masked_test": masked_test, "model_speed": model_speed,
              "phase_loop": phase_loop, "sdpa_shapes": sdpa_shapes, "data_scale": data_scale}


# ----------------------------------------------------------------------------- report

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
        print(f"  {'phase':>5} {'steps':>5} {'new':>4} {'masked':>6} {'replayed':>8} {'ms/step':>8}   (each step alone)")
        for r in res["phases"]:
            print(f"  {r['phase']:>5} {r['steps']:>5} {r['new_per_step']:>4} {r.get('new_masked_per_step', 0):>6} "
                  f"{r['replayed_per_step']:>8} {r['step_ms']:>8.1f}")
    elif name == "sdpa_shapes":
        print(f"sdpa_shapes ({res['vit']} at {res['image_size']} px on {res['device_name'] or 'cpu'}, ms a step, "
              f"{res['steps']} steps each)")
        for r in res["rows"]:
            print(f"  {r['kernels']:<10} one shape {r['one_shape_ms']:>7.1f}  new shapes {r['new_shapes_ms']:>7.1f}  "
                  f"the same again {r['same_shapes_again_ms']:>7.1f}")
    elif name == "mask_precision":
        print(f"mask_precision ({res['data']}, {res['rows']} training rows, {res['kept_patches']} patches kept; "
              f"{100 * res['object_share_of_patches']:.0f} % of all patches are object)")
        print(f"  {'rule':>8} {'on object':>10} {'fidelity':>9}")
        for rule, r in res["rules"].items():
            print(f"  {rule:>8} {100 * r['on_object']:>9.1f}% {r['fidelity']:>9.3f}")
    elif name == "masked_test":
        print(f"masked_test ({res['run']} on {res['data']}, {res['test_rows']} test rows; old = classes before "
              f"the last phase's {res['last_phase_classes']})")
        print(f"  {'patches':>7} {'old acc':>8} {'last-phase acc':>14} {'old put in last phase':>21}")
        for r in res["rows"]:
            print(f"  {r['kept_patches']:>7} {r['old_class_accuracy']:>7.1f}% {r['last_phase_accuracy']:>13.1f}% "
                  f"{r['old_rows_put_in_last_phase']:>20.1f}%")
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
    p.add_argument("--repeats", type=int, default=o.repeats,
                   help="onnx_latency, replay_cost: timed calls per measurement (the median is reported)")
    p.add_argument("--warmup", type=int, default=o.warmup,
                   help="onnx_latency, replay_cost: untimed calls before each of the 5 blocks of timed calls")
    p.add_argument("--threads", type=int, default=o.threads)
    p.add_argument("--run", default=o.run, help="onnx_export, onnx_latency: a trained method folder instead of the "
                   "default model; masked_test: the run to test (the other benchmarks do not use it)")
    p.add_argument("--device", default=o.device, help="model_speed: cpu or cuda")
    p.add_argument("--batch", type=int, default=o.batch, help="model_speed: images per call (0 = 256 cuda, 16 cpu)")
    p.add_argument("--steps", type=int, default=o.steps, help="timed calls per row: model_speed (0 = 10 cuda, 3 cpu), "
                   "phase_loop (0 = 10 a step shape), sdpa_shapes (0 = 30 a kind)")
    p.add_argument("--compile", action="store_true",
                   help="model_speed: also the compiled steps; phase_loop: the loop as train.py --compile runs it")
    p.add_argument("--replay-passes", type=int, default=o.replay_passes,
                   help="phase_loop: the loop as train.py --replay-passes runs it (every exemplar K times an epoch)")
    p.add_argument("--profile", action="store_true",
                   help="model_speed: each row's time split by kernel kind (matmul, attention, other; torch.profiler)")
    p.add_argument("--vit", default=o.vit, help="model_speed: a timm ViT name instead of SPEED_VITS")
    p.add_argument("--data", default=o.data, help="mask_precision (a manifest with object masks), masked_test: the data (default: embedded)")
    p.add_argument("--keep-image", type=float, default=o.keep_image,
                   help="mask_precision: the share of patches kept (default: train.py's --keep-image)")
    p.add_argument("--sizes", default=",".join(map(str, o.sizes)), help="data_scale: manifest sizes, comma-separated")
    p.add_argument("--scale-dir", default=o.scale_dir, help="data_scale: where the manifests and caches go (GBs)")
    p.add_argument("--scale-steps", type=int, default=o.scale_steps, help="data_scale: ViT-B/16 training steps after start-up")
    a = p.parse_args(argv)
    bad = lambda msg: p.exit(2, f"error: {msg}\n")   # one line, no usage, exit 2 as argparse's errors
    try:
        sizes = tuple(int(x) for x in a.sizes.split(","))
    except ValueError:
        bad(f"--sizes: whole numbers of images, comma-separated (e.g. 5000,50000), got {a.sizes!r}")
    for name, v, low in (("--repeats", a.repeats, 1), ("--warmup", a.warmup, 0), ("--threads", a.threads, 0),
                         ("--steps", a.steps, 0), ("--batch", a.batch, 0), ("--replay-passes", a.replay_passes, 1),
                         ("--scale-steps", a.scale_steps, 0)):
        if v < low:
            bad(f"{name} must be at least {low}, got {v}")
    if any(n < 1 for n in sizes):
        bad(f"--sizes must be positive, got {a.sizes!r}")
    if not 0 <= a.keep_image <= 1:
        bad(f"--keep-image is a share of the patches, in (0, 1] (0: train.py's), got {a.keep_image}")
    opts = Opts(repeats=a.repeats, warmup=a.warmup, threads=a.threads, run=a.run, device=a.device, batch=a.batch,
                steps=a.steps, compile=a.compile, replay_passes=a.replay_passes, profile=a.profile, vit=a.vit, data=a.data,
                keep_image=a.keep_image, sizes=sizes, scale_dir=a.scale_dir, scale_steps=a.scale_steps)
    report = {"results": {}}
    if os.path.exists(a.out):
        with open(a.out) as f:
            report = json.load(f)
    report["machine"] = here = machine()
    # data_scale writes gigabytes: ask for it; masked_test reads a trained run: with --run
    names = a.only or [n for n in BENCHMARKS if n != "data_scale" and (n != "masked_test" or a.run)]
    if a.run and not set(names) & set(USE_RUN):
        bad(f"--run is used by {', '.join(USE_RUN)} only, and none of them is asked for")
    for name in names:
        res = BENCHMARKS[name](opts)
        report["results"][name] = dict(res, machine=here)
        show(name, res)
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        D.write_json(a.out, report)   # after each benchmark: a run stopped later keeps what it measured
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
