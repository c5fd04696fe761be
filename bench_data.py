"""The data-at-scale benchmark (issue #9), run through bench.py: train.py's start-up on generated
manifests of 224 px images, cold (the image cache built) and warm (a hit), each in a fresh process:
wall and CPU time, peak memory, batches cut from the cache.

    python bench.py --only data_scale --sizes 5000,50000 --scale-dir DIR

data_scale takes bench.Opts (o) and returns a JSON-able dict."""
from __future__ import annotations

import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import models as M


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


def data_scale(o) -> dict:
    """Data at scale: for each size in o.sizes, a generated manifest of 224 px JPEGs (recipes.make_fake,
    under o.scale_dir, reused when there), then in a fresh process (data_startup) train.py's start-up
    on it twice: cold (no image cache: it is built) and warm (a cache hit). Wall seconds, peak memory,
    ms per batch of 32 random rows; with --scale-steps, training steps of a ViT-B/16 after the largest
    manifest's warm start-up (does a 224-px run fit in RAM?)."""
    import shutil
    import subprocess
    import sys

    import recipes as R
    here = os.path.dirname(os.path.abspath(__file__))
    res = {"image_size": 224, "scale_dir": o.scale_dir, "rows": []}
    for n in o.sizes:
        folder = os.path.join(o.scale_dir, f"fake-{n}")
        manifest = os.path.join(folder, "manifest.csv")
        row = {"images": n}
        if not os.path.exists(manifest):
            t = time.perf_counter()
            R.make_fake(folder, n)
            row["generate_s"] = time.perf_counter() - t
        row["jpeg_mib"] = sum(e.stat().st_size for d in os.scandir(os.path.join(folder, "images"))
                              for e in os.scandir(d)) / 2 ** 20
        cache = os.path.join(o.scale_dir, f"cache-{n}")
        shutil.rmtree(cache, ignore_errors=True)
        for run in ("cold", "warm"):
            steps = o.scale_steps if run == "warm" and n == max(o.sizes) else 0
            code = (f"import json, bench_data; r = bench_data.data_startup({manifest!r}, {cache!r}, {o.threads}, {steps}); "
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
