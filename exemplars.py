"""Choosing exemplars and what they keep: herding on the model's fused features, then each chosen
sample's mask (which patches and words a masked exemplar stores), by the rule a method names.

The phase loop (train.py) calls candidates() after each phase, and mask_sets() for new samples shown
masked (--mask-new). Everything runs in batches of at most MASK_BATCH rows on the device, and each
sample's random noise is drawn up front per class (draw_noise), so a mask never depends on the batch
it was scored in. `cfg` is a train.Config.
"""
from __future__ import annotations

import itertools
from dataclasses import replace

import torch
import torch.nn.functional as F

import exmask
import models as M
from memory import herd, within_quota
from models import autocast

# exmask and its ablations: (image mask, text mask, cross-modal context term). Image masks:
# "model": the rule Config.image_mask names, from the model's own signals; otherwise a rule of
# image_keep: "paper" (the top of the raw pooling-query attention row), "random", "object" (the
# true object mask, an oracle where the data has masks); None: kept whole.
# Text masks: "attn" (pooling attention, plus the context term where on), "random", None.
MASKING = {
    "exmask": ("model", "attn", True),
    "paper-mask": ("paper", "attn", True),
    "random-mask": ("random", "random", False),
    "oracle-mask": ("object", "attn", True),
    "image-mask": ("model", None, False),
    "text-mask": (None, "attn", False),
    "no-context": ("model", "attn", False),
}
# Config.image_mask: how exmask picks the patches it keeps (see image_keep)
IMAGE_MASKS = ("attn", "spread", "sample", "class", "feature", "random")


MASK_BATCH = 256        # most rows in one forward pass when scoring and masking (bounded device memory)
MAX_COPIES = 8          # cfg.fill "copies": most masked copies of one row (beyond, each copy keeps more patches)


def draw_noise(n: int, N: int, L: int, gen: torch.Generator, method: str = "", cfg=None) -> dict:
    """Uniform noise for the masks of n samples, drawn up front so that a sample's mask does not
    depend on the batches it is scored in: image (C, n, N), text (n, L). Only what the method's
    rules use is drawn (C = cfg.mask_candidates for "class" and "feature", 1 for the other random
    rules; text noise for random text masks); without a method or config, everything (C = 8)."""
    img_mode, txt_mode, _ = MASKING.get(method, ("feature", "random", False))
    rule = cfg.image_mask if cfg is not None and img_mode == "model" else img_mode
    C = ((cfg.mask_candidates if cfg is not None else 8) if rule in ("class", "feature") else
         1 if rule in ("random", "object", "sample") else 0)
    text = txt_mode == "random" and (cfg is None or cfg.keep_text < 1)
    return {"image": torch.rand(C, n, N, generator=gen), "text": torch.rand(n, L if text else 0, generator=gen)}


def mask_modes(model: M.TwoTower, method: str, cfg) -> tuple:
    """What `method` masks on this model (MASKING): (image mode or None, text mode or None, context
    term): the image only of a model that uses images, the text only of one that uses text at
    keep_text < 1 (whole text: no positions stored)."""
    img_mode, txt_mode, context = MASKING.get(method, (None, None, False))
    return (img_mode if model.use_image else None,
            txt_mode if model.use_text and cfg.keep_text < 1 else None, context)


def masks_anything(model: M.TwoTower, method: str, cfg) -> bool:
    """Whether `method`'s masked view of a sample differs from the sample (mask_modes)."""
    img_mode, txt_mode, _ = mask_modes(model, method, cfg)
    return bool(img_mode or txt_mode)


@torch.no_grad()
def image_keep(model: M.TwoTower, x: torch.Tensor, ids: torch.Tensor, attn: torch.Tensor, rule: str, cfg,
               noise: torch.Tensor, labels: torch.Tensor | None = None, objects: torch.Tensor | None = None,
               feats: torch.Tensor | None = None, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """The patches a masked exemplar keeps: (n, K) indices, ascending. x (n, N, P) full samples on the
    device, ids (n, L), attn (n, N) the image pooling query's last-block attention row, noise (C, n, N)
    uniform (draw_noise), feats (n, F) the full samples' fused features where the caller has them.
    Rules: "attn" top attention (smoothed over cfg.smooth_image); "spread" the top of each 2 x 2 region
    first; "sample" drawn in proportion to attention; "class" / "feature" the best of the C random
    masks by the adapted model's own score for the sample's class / by the cosine between the
    masked and the full image embedding; "paper" top raw attention; "random"; "object" the oracle.
    exclude (n, N) bool: patches not to keep while others are left (another copy of the row keeps them)."""
    n, N = x.shape[:2]
    K = exmask.keep_count(N, cfg.keep_image)
    g = model.cfg.vit.grid

    def top(scores: torch.Tensor) -> torch.Tensor:   # (n, N) -> (n, K), the excluded patches last
        return exmask.keep_top(scores if exclude is None else scores.masked_fill(exclude.to(scores.device), -float("inf")), K)
    if rule == "random":
        return top(noise[0])
    if rule == "object":
        if objects is None:
            raise SystemExit("error: oracle-mask needs object masks: a manifest `mask` column (data.py icons writes one)")
        return top(objects + 1e-3 * noise[0])
    a = attn.float().cpu()
    if rule == "paper":
        return top(a)
    a = exmask.smooth_scores(a, g, cfg.smooth_image)
    if rule == "attn":
        return top(a)
    if rule == "spread":
        return top(exmask.spread_scores(a, g) if g % 2 == 0 else a)
    if rule == "sample":
        return top(exmask.sample_scores(a, noise[0]))
    # "class" / "feature": the best of several random masks by the model's own judgement
    dev = x.device
    with autocast(cfg.device):
        if feats is None:
            feats = model.features(x, M.all_patches(x), ids.to(dev))
        E = feats.shape[1] - (model.cfg.text.embed_dim or model.cfg.text.dim) * model.use_text
        full = feats[:, :E].float().to(dev)                                            # (n, E) unit length
        txt = feats[:, E:].to(dev) if model.use_text else None                         # classify re-normalises
        idx = torch.stack([top(u) for u in noise]).to(dev)                             # (C, n, K)
        s = []
        for cand in idx:   # one candidate of every row per pass: at most n <= MASK_BATCH rows on the device
            # the candidate as it would replay (with cfg.lowres: whole, the rest from its thumbnail)
            v = exmask.masked_view(x, None, cand, None, 0, model.cfg.vit.patch_size, cfg.lowres)  # (n, K|N, P)
            emb = model.image(v["pixels"], v["patch_idx"]).float()                      # (n, E)
            if rule == "class":
                lp = model.classify(emb, txt).float().log_softmax(-1)                   # (n, C') txt None: image only
                s.append(lp.gather(1, labels.to(dev)[:, None])[:, 0])
            else:
                s.append(F.cosine_similarity(emb, full, dim=-1))
        best = torch.stack(s).argmax(0)                                                # (n,) first best wins
    return idx[best, torch.arange(n, device=dev)].cpu()


@torch.no_grad()
def signals(model: M.TwoTower, data: dict, rows: torch.Tensor, cfg) -> dict:
    """The model's view of dataset rows, in batches of MASK_BATCH: feats (n, F) fused features (for
    herding and the feature rule), img_attn (n, N) and txt_attn (n, L) the pooling tokens'
    attention rows (None for an unused tower). Small per row: token features are not kept."""
    model.eval()
    out = {"feats": [], "img_attn": [], "txt_attn": []}
    L = data["ids"].shape[1]
    for r in rows.split(MASK_BATCH):
        x = data["patches"][r].to(cfg.device)
        ids = exmask.trim_ids(data["ids"][r], model.cfg.text.pad_id)                 # (n, L') the padding skipped
        with autocast(cfg.device):
            f, (ia, ta) = model.features(x, M.all_patches(x), ids.to(cfg.device), aux=True)
        out["feats"].append(f.float().cpu())
        out["img_attn"].append(ia[0].float().cpu() if ia is not None else None)
        out["txt_attn"].append(F.pad(ta[0].float().cpu(), (0, L - ids.shape[1])) if ta is not None else None)  # (n, L)
    return {k: torch.cat(v) if v and v[0] is not None else None for k, v in out.items()}


@torch.no_grad()
def mask_sets(model: M.TwoTower, data: dict, rows: torch.Tensor, method: str, cfg, noise: dict,
              sig: dict | None = None, exclude: torch.Tensor | None = None) -> dict:
    """What the masked exemplars of dataset rows `rows` keep (method from MASKING), in batches of at
    most MASK_BATCH rows on the device: keep_idx (n, K) kept patch indices or None, keep (n, L) kept
    tokens or None. noise: draw_noise for these rows; sig: their signals() where the caller has them;
    exclude (n, N): patches to keep only where too few others are left (image_keep)."""
    model.eval()
    dev, pad = cfg.device, model.cfg.text.pad_id
    img_mode, txt_mode, context = mask_modes(model, method, cfg)
    # the cross-modal term compares text tokens with image patches, which means something only where
    # the towers were trained into one space (model.cfg.shared_space; equal widths are not enough):
    # token features recomputed per batch, never kept
    tokens = txt_mode == "attn" and context and img_mode is not None and model.cfg.shared_space
    rule = cfg.image_mask if img_mode == "model" else img_mode
    # random or oracle patches, and whole or random text, need nothing from the model
    if sig is None and (rule not in (None, "random", "object") or txt_mode == "attn"):
        sig = signals(model, data, rows, cfg)
    keep_idx, keep = [], []
    for part in torch.arange(len(rows)).split(MASK_BATCH):
        r, ids = rows[part], data["ids"][rows[part]]
        x = data["patches"][r].to(dev)
        n, N = x.shape[:2]
        dropped = torch.zeros(n, N, dtype=torch.bool)
        if img_mode:
            ki = image_keep(model, x, ids, sig["img_attn"][part] if sig else None, rule, cfg, noise["image"][:, part],
                            data["labels"][r], data["objects"][r] if "objects" in data else None,
                            sig["feats"][part].to(dev) if sig else None, None if exclude is None else exclude[part])
            keep_idx.append(ki)                                                        # (n, K)
            dropped = torch.ones(n, N, dtype=torch.bool).scatter_(1, ki, False)
        if txt_mode:
            _, content = exmask.special_tokens(ids, pad)
            if txt_mode == "random":
                tscore = noise["text"][part]
            else:
                ctx = None
                if tokens:
                    with autocast(dev):
                        _, (ia, ta) = model.features(x, M.all_patches(x), ids.to(dev), aux=True)
                    ctx = exmask.context_scores(ta[1].float().cpu(), ia[1].float().cpu(), dropped)
                tscore = exmask.text_scores(sig["txt_attn"][part], content, ctx, cfg.context_weight)
            keep.append(exmask.keep_text(tscore, ids, pad, cfg.keep_text))              # (n, L)
    return {"keep_idx": torch.cat(keep_idx) if keep_idx else None, "keep": torch.cat(keep) if keep else None}


@torch.no_grad()
def masked_features(model: M.TwoTower, data: dict, rows: torch.Tensor, m: dict, cfg) -> torch.Tensor:
    """Fused features (n, F) of dataset rows `rows` as their masked exemplars (mask sets m, from
    mask_sets) replay: the kept patches (with cfg.lowres, made whole from the thumbnail) and the
    kept words, in batches of MASK_BATCH rows."""
    model.eval()
    out = []
    for part in torch.arange(len(rows)).split(MASK_BATCH):
        v = exmask.masked_view(data["patches"][rows[part]], data["ids"][rows[part]],
                               None if m["keep_idx"] is None else m["keep_idx"][part],
                               None if m["keep"] is None else m["keep"][part], model.cfg.text.pad_id,
                               model.cfg.vit.patch_size, cfg.lowres)
        with autocast(cfg.device):
            out.append(model.features(*(v[k].to(cfg.device) for k in ("pixels", "patch_idx", "ids", "pos"))).float().cpu())
    return torch.cat(out)


def candidates(model: M.TwoTower, data: dict, classes: list[int], method: str, cfg,
               gen: torch.Generator, quota: int | None = None, fill_quota: int | None = None) -> tuple[dict, list]:
    """Exemplars for the new classes, in herding order on the fused features; masked for exmask
    and its ablations. Herding (cfg.herding "full": on the full samples' features; "masked": on the
    masked exemplars', toward the full samples' class mean) stops once a class's exemplars fill
    `quota` bytes (the budget's share per class; None = keep all), the same cut Memory.add makes
    (memory.within_quota), and (herding "full") only the samples herding reaches are masked, a batch
    at a time. A masked exemplar keeps cfg.keep_image of the patches, and with cfg.lowres its whole
    image at 1/cfg.lowres of its side (exmask.thumbnail). Where the class has too few rows to fill
    its quota at that share, cfg.fill "patches" gives each more patches (exmask.fill_keep) and
    "copies" stores every row again, round by round in herding order, each copy keeping patches that
    the row's earlier copies do not (while any are left), until the quota is full (at most MAX_COPIES
    of a row, each then with more patches). fill_quota (default: quota) is the share those two size
    the exemplars for: the share a class will have in the last phase (under a fixed total budget
    smaller than now), so that the trimming of later phases (Memory.add) does not drop whole rows of
    an early class that sharper exemplars had crowded out.
    Also returns, for the picture, the first exemplar of up to 4 classes."""
    out, shown = {}, []
    V, pad = model.cfg.text.vocab_size, model.cfg.text.pad_id
    N, P = data["patches"].shape[1:]
    img_mode, txt_mode, _ = mask_modes(model, method, cfg)
    masked = img_mode is not None                      # the image is masked (text-mask keeps it whole)
    p, lowres = model.cfg.vit.patch_size, cfg.lowres if masked else 0
    for c in classes:
        rows = (data["is_train"] & (data["labels"] == c)).nonzero().flatten()
        K = exmask.keep_count(N, cfg.keep_image) if masked else N
        rounds = 1                                     # masked copies of each row (cfg.fill "copies")
        one = K * P * model.use_image + 2              # an exemplar's bytes, about (exact for masked ones below)
        if masked:   # too few rows to fill the quota at that share: each keeps more patches (exmask.fill_keep)
            caps = data["ids"][rows]
            longest = int((caps != pad).sum(1).max()) * model.use_text if len(rows) else 0
            most = exmask.exemplar_bytes(N, P, longest, V, caps.shape[1], K / N,    # the class's largest exemplar
                                         cfg.keep_text if txt_mode else None, cfg.lowres)
            other = most - K * P                                                      # its bytes besides the patches
            fq = quota if fill_quota is None else fill_quota
            filled = exmask.fill_keep(len(rows), fq, N, P, other, K)
            if cfg.fill == "copies" and filled > K:   # every row fits: more masked copies of each row at K
                rounds = fq // (len(rows) * (other + K * P)) + 1                      # the last one cut by the quota
                if rounds > MAX_COPIES:   # very few rows: the most copies, each with more patches
                    rounds, K = MAX_COPIES, exmask.fill_keep(len(rows) * MAX_COPIES, fq, N, P, other, K)
            else:
                K = filled
            one = other + K * P
        ccfg = replace(cfg, keep_image=K / N)          # this class's share: keep_count(N, K / N) == K
        step = MASK_BATCH if quota is None else max(1, min(MASK_BATCH, quota // one + 1))
        sig = signals(model, data, rows, cfg)
        noise = draw_noise(len(rows), N, data["ids"].shape[1], gen, method, ccfg)
        first = []                                   # what the picture shows of this class
        pre = None
        if cfg.herding == "masked" and masked:       # every row masked first, herded as it will be stored
            pre = mask_sets(model, data, rows, method, ccfg, noise, sig)
            order = herd(masked_features(model, data, rows, pre, ccfg), target=sig["feats"])
        else:
            order = herd(sig["feats"])

        used = torch.zeros(len(rows), N, dtype=torch.bool) if rounds > 1 else None   # kept by a row's earlier copies
        if rounds > 1:   # round by round, each in herding order, each copy keeping patches the others do not
            ranked = list(order)
            passes = [iter(ranked) for _ in range(rounds)]
            noises = [noise] + [draw_noise(len(rows), N, data["ids"].shape[1], gen, method, ccfg)
                                for _ in range(rounds - 1)]
        else:
            passes, noises = [order], [noise]

        def herded():
            for n, ordered in enumerate(passes):
                while len(part := torch.tensor(list(itertools.islice(ordered, step)), dtype=torch.long)):
                    yield from encoded(part, noises[n], n > 0)

        def encoded(part: torch.Tensor, round_noise: dict, again: bool = False):
            r = rows[part]
            m = ({k: None if v is None else v[part] for k, v in pre.items()} if pre is not None and not again else
                 mask_sets(model, data, r, method, ccfg, {k: v[..., part, :] for k, v in round_noise.items()},
                           {k: None if v is None else v[part] for k, v in sig.items()}, used[part] if again else None)
                 if method in MASKING else {"keep_idx": None, "keep": None})
            if used is not None and m["keep_idx"] is not None:
                used[part] = used[part].scatter(1, m["keep_idx"], True)
            patches, ids = data["patches"][r], data["ids"][r]
            thumbs = exmask.thumbnail(patches, p, lowres) if lowres else [None] * len(part)
            for j in range(len(part)):
                ki, kt = (None if m[k] is None else m[k][j] for k in ("keep_idx", "keep"))
                if not first:
                    first.append({"patches": patches[j], "kept": ki, "ids": ids[j], "keep": kt, "label": c,
                                  "attn": None if sig["img_attn"] is None else sig["img_attn"][part[j]]})
                # store nothing of a modality the model does not use
                yield exmask.encode(patches[j] if model.use_image else None, ids[j] if model.use_text else None,
                                    c, V, pad, ki, kt, thumbs[j])

        out[c] = within_quota(herded(), quota)
        if len(shown) < 4 and method in MASKING and out[c]:
            shown += first
    return out, shown
