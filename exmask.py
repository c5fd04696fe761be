"""Exemplar masking as pure functions of tensors (arXiv 2412.09549; the README's "How it works"
says how this repository reads the paper).

  1. smooth_scores / keep_top: rank patches by the pooling query's attention in the image tower's
     last block (mean over heads), optionally averaged over each patch's 3 x 3 neighbours, and keep
     the top share, in ascending patch order: the paper's rule and its smoothed form (`paper`,
     `attn`). The default rule, `feature` (the best of several random masks by how close the masked
     embedding stays to the full one), lives in exemplars.image_keep, which uses these functions.
  2. text_scores: rank caption tokens by (a) the text pooling token's attention (class words) plus
     (b) their similarity to the *discarded* patches in the shared embedding space (context words:
     what the image lost, the text keeps). Special tokens (position 0 and the end marker) always stay.
  3. encode / collate: a stored exemplar is its kept uint8 patches plus its kept token ids
     (narrowest integer type), and which patch and token positions were kept, as bit masks;
     collate batches them for replay at their original positions, padding captions with pad_id
     (masked out of attention).
  4. mixup replay: same-class modality recombination and cross-exemplar token mixup.

Randomness comes from a passed torch.Generator; tensors are made on the input's device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def int_dtype(n: int) -> torch.dtype:
    """The narrowest integer dtype that holds the values 0..n-1."""
    for dt, hi in ((torch.uint8, 256), (torch.int16, 2 ** 15), (torch.uint16, 2 ** 16)):
        if n <= hi:
            return dt
    return torch.int32


def keep_count(n: int, share: float) -> int:
    return max(1, min(n, round(n * share)))


def keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores (B, N) -> indices of the k largest (B, k), in ascending order."""
    return scores.topk(k, dim=1).indices.sort(dim=1).values


def smooth_scores(scores: torch.Tensor, grid: int, k: int) -> torch.Tensor:
    """scores (B, grid*grid) over a square patch grid -> each patch's mean over its k x k
    neighbourhood (k odd; k <= 1 returns scores as they are). Objects are contiguous and one
    patch's attention is noisy: on the embedded data a 3 x 3 mean lifts the share of kept patches
    that lie on the object from 37 % to 54 % (bench.py --only mask_precision)."""
    if k <= 1:
        return scores
    x = scores.reshape(-1, 1, grid, grid)
    return F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False).reshape(scores.shape)


def spread_scores(scores: torch.Tensor, grid: int, cell: int = 2) -> torch.Tensor:
    """scores (B, grid*grid) -> scores whose top k is the best patch of every cell x cell region of
    the grid first, then the second best of each, and so on (regions ordered by that patch's score):
    importance within regions, coverage across them."""
    B = scores.shape[0]
    g = grid // cell
    x = scores.reshape(B, g, cell, g, cell).permute(0, 1, 3, 2, 4).reshape(B, g * g, cell * cell)  # (B, R, c*c)
    rank = x.argsort(-1, descending=True).argsort(-1).float()                     # 0 = best in its region
    s = (x - x.amin((1, 2), keepdim=True)) / (x.amax((1, 2), keepdim=True) - x.amin((1, 2), keepdim=True) + 1e-12)
    out = (s - 2 * rank)                                                           # rank first, score second
    return out.reshape(B, g, g, cell, cell).permute(0, 1, 3, 2, 4).reshape(B, grid * grid)


def sample_scores(scores: torch.Tensor, u: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Gumbel keys from uniform noise u (same shape): keep_top on them draws patches without
    replacement with probability proportional to score ** (1 / temperature) (scores > 0, e.g. attention)."""
    u = u.to(scores.device).clamp(1e-9, 1 - 1e-9)
    return scores.clamp(min=1e-12).log() / temperature - (-u.log()).log()


def _zscore(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Standardise each row over its valid entries; invalid entries come out 0."""
    n = valid.sum(1, keepdim=True).clamp(min=1)
    mean = (x * valid).sum(1, keepdim=True) / n
    var = (((x - mean) * valid) ** 2).sum(1, keepdim=True) / n
    return ((x - mean) / (var.sqrt() + 1e-6)) * valid


def context_scores(txt_tok: torch.Tensor, img_tok: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of each text token to the discarded patches.
    txt_tok (B, L, E), img_tok (B, N, E), dropped (B, N) bool -> (B, L)."""
    sim = F.normalize(txt_tok, dim=-1) @ F.normalize(img_tok, dim=-1).transpose(1, 2)  # (B, L, N)
    w = dropped.to(sim.dtype)
    return (sim * w[:, None, :]).sum(-1) / w.sum(-1, keepdim=True).clamp(min=1)


def text_scores(cls_row: torch.Tensor, content: torch.Tensor, ctx: torch.Tensor | None = None,
                alpha: float = 1.0) -> torch.Tensor:
    """cls_row (B, L): pooling-token attention; content (B, L) bool: droppable tokens (not special,
    not padding); ctx (B, L) context scores or None. Scores are standardised per caption so the two
    terms weigh alike; alpha weighs the context term."""
    s = _zscore(cls_row, content)
    if ctx is not None:
        s = s + alpha * _zscore(ctx, content)
    return s


def special_tokens(ids: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids -> (special, content) bool masks. Special: position 0 (the pooling token) and the
    last real token (the end marker, which data.encode_texts always keeps last)."""
    real = ids != pad_id
    special = torch.zeros_like(real)
    special[:, 0] = True
    special.scatter_(1, (real.sum(1, keepdim=True) - 1).clamp(min=0), True)
    return special & real, real & ~special


def keep_text(scores: torch.Tensor, ids: torch.Tensor, pad_id: int, share: float) -> torch.Tensor:
    """(B, L) scores and ids -> (B, L) bool keep mask: special tokens always, plus the top `share`
    of each caption's other tokens."""
    special, content = special_tokens(ids, pad_id)
    n_keep = (content.sum(1).float() * share).round().clamp(min=1).long()        # (B,)
    s = scores.masked_fill(~content, float("-inf"))
    rank = s.argsort(1, descending=True).argsort(1)                               # (B, L) rank of each token
    return special | (content & (rank < n_keep[:, None]))


# ----------------------------------------------------------------------------- storage

def thumbnail(patches: torch.Tensor, p: int, factor: int) -> torch.Tensor:
    """(n, N, C*p*p) uint8 patches of square images (patchify order) -> (n, C, S/factor, S/factor)
    uint8: the whole image at 1/factor of its side S (the mean of each factor x factor block). A
    low-resolution masked exemplar (--lowres, after CIM) stores it beside its kept patches."""
    S = math.isqrt(patches.shape[1]) * p
    if S % factor:
        raise ValueError(f"lowres {factor} must divide the image side ({S} px)")
    img = F.fold(patches.float().transpose(1, 2), S, p, stride=p)                 # (n, C, S, S)
    return F.avg_pool2d(img, factor).round().to(torch.uint8)


def fill_lowres(thumb: torch.Tensor, pixels: torch.Tensor, idx: torch.Tensor, p: int, n_patches: int,
                keep: torch.Tensor | None = None) -> torch.Tensor:
    """A low-resolution exemplar made whole: thumb (n, C, s, s) uint8 upsampled (bilinear) to the
    image's side, with its kept full-resolution patches pixels (n, K, P) put back at their indices
    idx (n, K) -> every patch (n, N, P) uint8, N = n_patches (patchify order). keep (n, K) bool:
    which of the K are real (padding leaves its position's upsampled pixels), or None (all)."""
    S = math.isqrt(n_patches) * p
    up = F.interpolate(thumb.float(), size=(S, S), mode="bilinear", align_corners=False)   # (n, C, S, S)
    full = F.unfold(up, p, stride=p).transpose(1, 2).round().clamp(0, 255).to(torch.uint8)  # (n, N, P)
    at = idx.long()[..., None].expand(-1, -1, full.shape[2])                       # (n, K, P)
    src = pixels.to(torch.uint8) if keep is None else torch.where(keep[..., None], pixels.to(torch.uint8), full.gather(1, at))
    return full.scatter(1, at, src)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(N,) bool -> (ceil(N / 8),) uint8, bit j of byte i set where mask[8 i + j]: a kept set of
    positions in N / 8 bytes (a list of indices costs a byte or more per kept position)."""
    m = F.pad(mask.to(torch.uint8), (0, -len(mask) % 8)).view(-1, 8)
    return (m << torch.arange(8, dtype=torch.uint8, device=mask.device)).sum(1).to(torch.uint8)


def unpack_mask(bits: torch.Tensor) -> torch.Tensor:
    """(..., n) uint8 -> (..., 8n) bool, the inverse of pack_bits."""
    return ((bits[..., None] >> torch.arange(8, dtype=torch.uint8, device=bits.device)) & 1).flatten(-2).bool()


def unpack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(n,) uint8 -> the kept positions, ascending (K,) int64."""
    return unpack_mask(bits).nonzero().flatten()


def encode(patches: torch.Tensor | None, ids: torch.Tensor | None, label: int, vocab_size: int, pad_id: int,
           idx: torch.Tensor | None = None, keep: torch.Tensor | None = None, thumb: torch.Tensor | None = None) -> dict:
    """One exemplar to store. patches (N, P) uint8, ids (L,) padded caption; None for a modality the
    model does not use (nothing of it is stored). idx (K,) kept patch indices or None (all kept:
    indices implied, not stored); keep (L,) bool kept tokens or None (all kept: positions implied).
    Kept positions are stored as bit masks (pack_bits). thumb (C, s, s) uint8: the whole image at a
    lower resolution (thumbnail), stored beside the kept patches (--lowres), or None."""
    ex = {"label": torch.tensor(label, dtype=torch.int16)}
    if thumb is not None and idx is not None:
        ex["thumb"] = thumb.to(torch.uint8).clone()
    if patches is not None and idx is None:
        ex["pixels"] = patches.to(torch.uint8).clone()
    elif patches is not None:
        idx = idx.sort().values
        ex["pixels"] = patches[idx].to(torch.uint8).clone()
        ex["patch_bits"] = pack_bits(torch.zeros(patches.shape[0], dtype=torch.bool).index_fill_(0, idx.long(), True))
    if ids is not None:
        real = ids != pad_id
        mask = real if keep is None else keep & real
        ex["ids"] = ids[mask].to(int_dtype(vocab_size))
        if keep is not None:
            ex["pos_bits"] = pack_bits(mask)
    return ex


def nbytes(ex: dict) -> int:
    """The exact bytes an exemplar stores: the sum of its arrays."""
    return sum(t.numel() * t.element_size() for t in ex.values())


def full_bytes(n_patches: int, patch_dim: int, context: int, vocab_size: int, image: bool = True,
               text: bool = True) -> int:
    """Bytes of one full exemplar at the longest caption: the budget's unit (the paper's
    'one sample per class'). A modality the model does not use costs nothing."""
    return (image * n_patches * patch_dim + text * context * int_dtype(vocab_size).itemsize
            + torch.int16.itemsize)


def fill_keep(n_rows: int, quota: int | None, n_patches: int, patch_dim: int, other_bytes: int, k_min: int) -> int:
    """Patches a class's masked exemplars keep: k_min (the --keep-image share), or more where the
    class has too few rows to fill its quota at k_min, as many as let every row fit in `quota`
    bytes (other_bytes: an upper bound on an exemplar's bytes besides its patches). Bytes a class
    cannot use otherwise go to sharper exemplars; with rows to spare, nothing changes."""
    if quota is None or n_rows == 0:
        return k_min
    return max(k_min, min(n_patches, (quota // n_rows - other_bytes) // patch_dim))


def exemplar_bytes(n_patches: int, patch_dim: int, tokens: int, vocab_size: int, context: int,
                   keep_image: float | None = None, keep_text: float | None = None, lowres: int = 0) -> int:
    """The bytes encode() stores for one exemplar whose caption has `tokens` real tokens (special ones
    included) in a row of `context`, counted without building it (to plan a budget before training).
    keep_image None: every patch, no bit mask (replay); a share: keep_count(n_patches, keep_image)
    patches and their bit mask (exmask, at any share). keep_text None or >= 1: the whole caption,
    no bit mask; below 1: the special tokens plus that share of the others (keep_text's rule) and
    their bit mask. lowres > 0 (with a share): the thumbnail too, the image at 1/lowres of its side."""
    img = n_patches * patch_dim
    if keep_image is not None:
        img = keep_count(n_patches, keep_image) * patch_dim + -(-n_patches // 8) + (n_patches * patch_dim // lowres ** 2
                                                                                      if lowres else 0)
    kept, bits = tokens, 0
    if keep_text is not None and keep_text < 1:
        special = min(tokens, 2)
        content = tokens - special
        share = int((torch.tensor(float(content)) * keep_text).round().clamp(min=1))   # keep_text's float32 rounding
        kept, bits = special + min(content, share), -(-context // 8)
    return img + kept * int_dtype(vocab_size).itemsize + bits + torch.int16.itemsize


def pack_tokens(ids: torch.Tensor, keep: torch.Tensor | None, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions ids (B, L) and which tokens to keep (B, L) bool (None: every real one) -> (ids, pos),
    each (B, L'): the kept tokens moved to the front in their order, with their original positions,
    padded with pad_id (position 0); L' the longest row, at least 1."""
    mask = ids != pad_id if keep is None else keep & (ids != pad_id)
    L = max(1, int(mask.sum(1).max())) if len(ids) else 1
    order = (~mask).to(torch.uint8).argsort(dim=1, stable=True)[:, :L]                 # kept first, in order
    kept = mask.gather(1, order)
    return torch.where(kept, ids.gather(1, order), pad_id), torch.where(kept, order, 0)


def collate(items: list[dict], pad_id: int, device="cpu", n_patches: int = 0) -> dict:
    """Stored exemplars -> a replay batch: pixels (B, K, P) uint8, patch_idx (B, K), ids (B, L)
    padded with pad_id, pos (B, L), labels (B,). Where items keep different numbers of patches (the
    fill rule gives a class with few rows more), K is the most and the batch also holds patch_keep
    (B, K) bool, the real ones (the padding sits at positions its row did not keep, and is masked
    out: models.TwoTower.forward_tokens). Low-resolution exemplars (with a "thumb") come back whole,
    every one of the n_patches patches (fill_lowres). train.py collates the whole memory once a
    phase and takes its steps' rows from it (take)."""
    B = len(items)
    keep = None
    if "pixels" in items[0]:
        n = torch.tensor([len(ex["pixels"]) for ex in items])
        pixels = torch.nn.utils.rnn.pad_sequence([ex["pixels"] for ex in items], batch_first=True)  # (B, K, P)
        if bool((n != n[0]).any()):
            keep = torch.arange(pixels.shape[1]) < n[:, None]                      # (B, K)
    else:                           # a text-only model stores no image: an empty stand-in
        pixels = torch.zeros(B, 0, 1, dtype=torch.uint8)
    K = pixels.shape[1]
    if "patch_bits" in items[0]:
        kept = unpack_mask(torch.stack([ex["patch_bits"] for ex in items]))       # (B, 8 * bytes)
        pidx = (~kept).to(torch.uint8).argsort(dim=1, stable=True)[:, :K]          # kept ones first, ascending
    else:
        pidx = torch.arange(K).expand(B, K)
    if "thumb" in items[0]:         # low resolution (--lowres): made whole, every patch real
        if not n_patches:
            raise ValueError("collate: low-resolution exemplars need n_patches")
        C = items[0]["thumb"].shape[0]
        p = math.isqrt(pixels.shape[2] // C)
        pixels = fill_lowres(torch.stack([ex["thumb"] for ex in items]), pixels, pidx, p, n_patches, keep)
        pidx, keep, K = torch.arange(n_patches).expand(B, n_patches), None, n_patches
    if "ids" in items[0]:
        lens = torch.tensor([len(ex["ids"]) for ex in items])
        L = max(1, int(lens.max()))
        ids = torch.nn.utils.rnn.pad_sequence([ex["ids"].long() for ex in items], batch_first=True,
                                              padding_value=pad_id)
        ids = F.pad(ids, (0, L - ids.shape[1]), value=pad_id)                      # (B, L)
        if "pos_bits" in items[0]:   # the kept positions, ascending, moved to the front
            kept = unpack_mask(torch.stack([ex["pos_bits"] for ex in items]))      # (B, 8 * bytes)
            pos = (~kept).to(torch.uint8).argsort(dim=1, stable=True)[:, :L]
        else:
            pos = torch.arange(L).expand(B, L)
        pos = torch.where(torch.arange(L) < lens[:, None], pos, 0)
    else:                           # an image-only model stores no caption: a pad token stands in
        ids, pos = torch.full((B, 1), pad_id, dtype=torch.long), torch.zeros(B, 1, dtype=torch.long)
    labels = torch.stack([ex["label"].long() for ex in items])
    out = dict(pixels=pixels, patch_idx=pidx, ids=ids, pos=pos, labels=labels)
    if keep is not None:
        out["patch_keep"] = keep
    return {k: v.to(device) for k, v in out.items()}


def masked_view(x: torch.Tensor, ids: torch.Tensor | None, keep_idx: torch.Tensor | None, keep: torch.Tensor | None,
                pad_id: int, p: int = 0, lowres: int = 0) -> dict:
    """Full samples seen as their masked exemplars replay (what collate gives for them stored), without
    storing them: x (n, N, P) uint8 patches, ids (n, L) captions or None (image only); keep_idx (n, K)
    kept patch indices or None (all), keep (n, L) kept tokens or None (all). With lowres (patch size
    p) the dropped patches come from the thumbnail and every patch is returned. -> pixels (n, K|N, P),
    patch_idx, and with ids, ids and pos (pack_tokens)."""
    every = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)       # (n, N)
    pidx = every if keep_idx is None else keep_idx.to(x.device)
    pixels = torch.gather(x, 1, pidx[..., None].expand(-1, -1, x.shape[2]))        # (n, K, P)
    if lowres and keep_idx is not None:
        pixels, pidx = fill_lowres(thumbnail(x, p, lowres), pixels, pidx, p, x.shape[1]), every
    out = {"pixels": pixels, "patch_idx": pidx}
    if ids is not None:
        out["ids"], out["pos"] = pack_tokens(ids, keep, pad_id)
    return out


def trim_ids(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Captions (B, L), each padded at its end with pad_id -> (B, L'), cut after the longest one (at
    least 1 column): what the text tower computes is the same, on fewer positions."""
    return ids[:, :max(1, int((ids != pad_id).sum(1).max())) if len(ids) else 1]


def take(batch: dict, rows: torch.Tensor, pad_id: int, L: int | None = None) -> dict:
    """Rows of a collated batch (see collate), the captions cut to the longest of those rows (L where
    the caller knows it: finding it on a GPU waits for the GPU): what collate of those exemplars gives."""
    out = {k: v[rows] for k, v in batch.items()}
    if L is None:
        L = max(1, int((out["ids"] != pad_id).sum(1).max())) if len(rows) else 1
    return dict(out, ids=out["ids"][:, :L], pos=out["pos"][:, :L])


def concat(batches: list[dict], pad_id: int) -> dict:
    """Batches in collate's layout, one after another in one batch: captions padded to the longest
    (pad_to), patches to the most kept, the padding marked out by patch_keep (B, K) as collate marks
    it; mixup fields (lam, labels_b) where any batch has them, the others' rows unmixed (lam 1). An
    unused modality's stand-in (no patches, or a lone pad token) is padded like the rest."""
    if len(batches) == 1:
        return batches[0]
    L = max(b["ids"].shape[1] for b in batches)
    K = max(b["pixels"].shape[1] for b in batches)
    P = max(b["pixels"].shape[2] for b in batches if b["pixels"].shape[1]) if K else batches[0]["pixels"].shape[2]
    parts = {k: [] for k in ("pixels", "patch_idx", "patch_keep", "ids", "pos", "labels", "labels_b", "lam")}
    for b in batches:
        B, k = b["pixels"].shape[:2]
        px = b["pixels"] if k else b["pixels"].new_zeros(B, 0, P)
        real = b.get("patch_keep", torch.ones(B, k, dtype=torch.bool, device=px.device))
        parts["pixels"].append(F.pad(px, (0, 0, 0, K - k)))                              # (B, K, P)
        parts["patch_idx"].append(F.pad(b["patch_idx"], (0, K - k)))                   # the padding at 0, masked out
        parts["patch_keep"].append(F.pad(real, (0, K - k), value=False))
        t = pad_to(b, L, pad_id)
        parts["ids"].append(t["ids"])
        parts["pos"].append(t["pos"])
        parts["labels"].append(b["labels"])
        parts["labels_b"].append(b.get("labels_b", b["labels"]))
        parts["lam"].append(b.get("lam", torch.ones(B, device=px.device)))
    out = {k: torch.cat(v) for k, v in parts.items()}
    if not any("patch_keep" in b for b in batches) and len({b["pixels"].shape[1] for b in batches}) == 1:
        del out["patch_keep"]          # every patch real: no mask (the plain attention path)
    if not any("lam" in b for b in batches):
        del out["labels_b"], out["lam"]
    return out


# ----------------------------------------------------------------------------- mixup replay

def pad_to(batch: dict, L: int, pad_id: int) -> dict:
    """Pad a batch's captions to length L."""
    n = L - batch["ids"].shape[1]
    if n <= 0:
        return batch
    return dict(batch, ids=F.pad(batch["ids"], (0, n), value=pad_id), pos=F.pad(batch["pos"], (0, n)))


def recombine(a: dict, b: dict, which: torch.Tensor, pad_id: int) -> dict:
    """Same-class modality recombination: where `which` (B,) is set, a's kept image tokens with b's
    kept text. b[i] must be of a[i]'s class, so the labels stand."""
    L = max(a["ids"].shape[1], b["ids"].shape[1])
    a, b = pad_to(a, L, pad_id), pad_to(b, L, pad_id)
    w = which[:, None]
    return dict(a, ids=torch.where(w, b["ids"], a["ids"]), pos=torch.where(w, b["pos"], a["pos"]))


def token_mixup(a: dict, b: dict, lam: torch.Tensor, pad_id: int, generator: torch.Generator) -> dict:
    """Cross-exemplar token mixup: sample i takes a random lam[i] share of a[i]'s kept patches and
    caption tokens and fills the rest from b[i]'s, every token at its own original position and no
    position twice (where b's patch sits where a's already is, another of a's fills the slot).
    The label becomes lam'*y_a + (1-lam')*y_b, lam' the share of a's patches actually taken;
    returned as labels (a), labels_b and lam (B,)."""
    B, K, P = a["pixels"].shape
    dev = a["pixels"].device
    rand = lambda *shape: torch.rand(shape, generator=generator).to(dev)
    lam_eff, out = lam.float().to(dev), dict(a)
    if K:
        # rows that keep fewer patches are padded (collate's patch_keep): padding is the last choice
        real_a, real_b = a.get("patch_keep"), b.get("patch_keep")
        ragged = real_a is not None
        k_a = (lam * K).round().long().clamp(0, K).to(dev)                            # (B,)
        # candidates in preference order: a's first k_a (random order), then b's, then the rest of a's
        take_a, take_b = rand(B, K).argsort(1), rand(B, K).argsort(1)                 # (B, K)
        if ragged:   # real patches first, each in random order; k_a counts a's real ones
            k_a = (lam.to(dev) * real_a.sum(1)).round().long()
            take_a = (take_a.argsort(1) + K * ~real_a).argsort(1)
            take_b = (take_b.argsort(1) + K * ~real_b).argsort(1)
        pix = torch.cat([a["pixels"].gather(1, take_a[..., None].expand(-1, -1, P)),
                         b["pixels"].gather(1, take_b[..., None].expand(-1, -1, P))], 1)   # (B, 2K, P)
        pidx = torch.cat([a["patch_idx"].gather(1, take_a), b["patch_idx"].gather(1, take_b)], 1)  # (B, 2K)
        j = torch.arange(K, device=dev)
        prio = torch.cat([torch.where(j[None] < k_a[:, None], 0, 2), torch.ones(B, K, dtype=torch.long, device=dev)], 1)
        if ragged:
            real = torch.cat([real_a.gather(1, take_a), real_b.gather(1, take_b)], 1)   # (B, 2K)
            prio = torch.where(real, prio, 3)
        order = (prio * 2 * K + torch.arange(2 * K, device=dev)).argsort(1)           # (B, 2K), stable
        pidx, from_a = pidx.gather(1, order), order < K
        # the first occurrence of each position survives; a alone has K distinct ones (its padding
        # sits at positions it did not keep), so K always do
        onehot = F.one_hot(pidx, int(pidx.max()) + 1)                                 # (B, 2K, N)
        first = (onehot.cumsum(1) * onehot).sum(-1) == 1                              # (B, 2K)
        rank = first.cumsum(1)
        pick = (first & (rank <= K)).float().argsort(dim=1, descending=True, stable=True)[:, :K]  # (B, K)
        src_pos = order.gather(1, pick)                                                # into the 2K candidates
        out.update(pixels=pix.gather(1, src_pos[..., None].expand(-1, -1, P)), patch_idx=pidx.gather(1, pick))
        lam_eff = from_a.gather(1, pick).float().mean(1)                               # (B,)
        if ragged:
            kept = real.gather(1, src_pos)                                             # (B, K), by preference
            kept &= kept.cumsum(1) <= real_a.sum(1, keepdim=True)                     # as many as a keeps
            out["patch_keep"] = kept
            lam_eff = (from_a.gather(1, pick) & kept).sum(1) / kept.sum(1).clamp(min=1)
    # text: a's pooling (first) and end (last) tokens stay; the content tokens are shared out by
    # lam_eff, a random share of a's and of b's, never two at one position
    ra, rb = a["ids"] != pad_id, b["ids"] != pad_id                                   # (B, La), (B, Lb)
    ja, jb = torch.arange(ra.shape[1], device=dev), torch.arange(rb.shape[1], device=dev)
    ca = ra & (ja > 0) & (ja < ra.sum(1, keepdim=True) - 1)                           # a's content tokens
    cb = rb & (jb > 0) & (jb < rb.sum(1, keepdim=True) - 1)

    def some(cand: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """k[i] of row i's candidates, at random: (B, L) bool."""
        rank = rand(*cand.shape).masked_fill(~cand, 2.0).argsort(1).argsort(1)
        return cand & (rank < k[:, None])

    sel_a = some(ca, (lam_eff * ca.sum(1)).round().long())
    keep_a = sel_a | (ra & ~ca)                                                        # + a's first and last
    Q = int(max(a["pos"].max(), b["pos"].max())) + 1 if a["pos"].numel() and b["pos"].numel() else 1
    taken = torch.zeros(B, Q + 1, dtype=torch.bool, device=dev)
    taken.scatter_(1, torch.where(keep_a, a["pos"], Q), True)                          # column Q: a sink
    free = cb & ~taken[:, :Q].gather(1, b["pos"].clamp(max=Q - 1))
    sel_b = some(free, torch.minimum(free.sum(1), ((1 - lam_eff) * cb.sum(1)).round().long()))
    # order: a's first token, a's share, b's share, a's end token; the rest dropped
    first_a, last_a = ra & (ja == 0), ra & ~ca & (ja > 0)
    group = torch.cat([torch.where(first_a, 0, torch.where(sel_a, 1, torch.where(last_a, 3, 4))),
                       torch.where(sel_b, 2, 4)], 1)                                   # (B, La + Lb)
    L = max(1, int((group < 4).sum(1).max()))
    order = group.argsort(dim=1, stable=True)[:, :L]
    kept = group.gather(1, order) < 4
    ids = torch.where(kept, torch.cat([a["ids"], b["ids"]], 1).gather(1, order), pad_id)
    pos = torch.where(kept, torch.cat([a["pos"], b["pos"]], 1).gather(1, order), 0)
    return dict(out, ids=ids, pos=pos, labels_b=b["labels"], lam=lam_eff)
