"""Exemplar masking as pure functions of tensors (arXiv 2412.09549, with our reading of it in
shared/DESIGN.md).

  1. smooth_scores / keep_top: rank patches by the pooling query's attention in the image tower's
     last block (mean over heads), by default averaged over each patch's 3 x 3 neighbours, and keep
     the top share, in ascending patch order.
  2. text_scores: rank caption tokens by (a) the text pooling token's attention (class words) plus
     (b) their similarity to the *discarded* patches in the shared embedding space (context words:
     what the image lost, the text keeps). Special tokens (position 0 and the end marker) always stay.
  3. encode / collate: a stored exemplar is its kept uint8 patches and patch indices plus its kept
     token ids (narrowest integer type) and positions; collate batches them for replay at their
     original positions, padding captions with pad_id (masked out of attention).
  4. mixup replay: same-class modality recombination and cross-exemplar token mixup.

Randomness comes from a passed torch.Generator; tensors are made on the input's device.
"""
from __future__ import annotations

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


def random_scores(shape: tuple, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """Scores for the random-mask ablation: uniform, so keep_top keeps a random subset."""
    return torch.rand(shape, generator=generator).to(device)


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

def encode(patches: torch.Tensor, ids: torch.Tensor, label: int, vocab_size: int, pad_id: int,
           idx: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> dict:
    """One exemplar to store. patches (N, P) uint8, ids (L,) padded caption.
    idx (K,) kept patch indices or None (all kept: indices implied, not stored);
    keep (L,) bool kept tokens or None (all kept: positions implied, not stored)."""
    real = ids != pad_id
    ex = {"label": torch.tensor(label, dtype=torch.int16)}
    if idx is None:
        ex["pixels"] = patches.to(torch.uint8).clone()
    else:
        ex["pixels"] = patches[idx].to(torch.uint8).clone()
        ex["patch_idx"] = idx.to(int_dtype(patches.shape[0]))
    mask = real if keep is None else keep & real
    ex["ids"] = ids[mask].to(int_dtype(vocab_size))
    if keep is not None:
        ex["pos"] = mask.nonzero().flatten().to(int_dtype(ids.shape[0]))
    return ex


def nbytes(ex: dict) -> int:
    """The exact bytes an exemplar stores: the sum of its arrays."""
    return sum(t.numel() * t.element_size() for t in ex.values())


def full_bytes(n_patches: int, patch_dim: int, context: int, vocab_size: int) -> int:
    """Bytes of one full exemplar at the longest caption: the budget's unit (the paper's
    'one sample per class')."""
    return (n_patches * patch_dim + context * int_dtype(vocab_size).itemsize
            + torch.int16.itemsize)


def collate(items: list[dict], pad_id: int, device="cpu") -> dict:
    """Stored exemplars -> a replay batch: pixels (B, K, P) uint8, patch_idx (B, K), ids (B, L)
    padded with pad_id, pos (B, L), labels (B,). All items must keep the same number of patches."""
    B = len(items)
    pixels = torch.stack([ex["pixels"] for ex in items])
    K = pixels.shape[1]
    if "patch_idx" in items[0]:
        pidx = torch.stack([ex["patch_idx"].long() for ex in items])
    else:
        pidx = torch.arange(K).expand(B, K)
    L = max(len(ex["ids"]) for ex in items)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    for i, ex in enumerate(items):
        n = len(ex["ids"])
        ids[i, :n] = ex["ids"].long()
        pos[i, :n] = ex["pos"].long() if "pos" in ex else torch.arange(n)
    labels = torch.stack([ex["label"].long() for ex in items])
    return {k: v.to(device) for k, v in dict(pixels=pixels, patch_idx=pidx, ids=ids, pos=pos, labels=labels).items()}


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
    caption tokens and fills the rest from b[i]'s, every token at its own original position.
    The label becomes lam'*y_a + (1-lam')*y_b, lam' the share of a's patches actually taken;
    returned as labels (a), labels_b and lam (B,)."""
    B, K, _ = a["pixels"].shape
    dev = a["pixels"].device
    k_a = (lam * K).round().long().clamp(0, K)                                        # (B,)
    # a random order of each sample's patches: the first k_a of a's, then the rest from b's
    take_a = torch.rand(B, K, generator=generator).to(dev).argsort(1)                 # (B, K)
    take_b = torch.rand(B, K, generator=generator).to(dev).argsort(1)
    from_a = torch.arange(K, device=dev)[None] < k_a[:, None]                        # (B, K)
    pix = torch.where(from_a[..., None], a["pixels"].gather(1, take_a[..., None].expand(-1, -1, a["pixels"].shape[2])),
                      b["pixels"].gather(1, take_b[..., None].expand(-1, -1, b["pixels"].shape[2])))
    pidx = torch.where(from_a, a["patch_idx"].gather(1, take_a), b["patch_idx"].gather(1, take_b))
    lam_eff = k_a.float() / K
    # text: a's special tokens and pooling token stay; content tokens are shared out by lam_eff
    ids, pos = [], []
    for i in range(B):
        ra_, rb_ = a["ids"][i] != pad_id, b["ids"][i] != pad_id
        ai, ap = a["ids"][i][ra_], a["pos"][i][ra_]
        bi, bp = b["ids"][i][rb_], b["pos"][i][rb_]
        na = max(0, len(ai) - 2)
        nb = max(0, len(bi) - 2)
        ka = int(round(float(lam_eff[i]) * na))
        kb = int(round((1 - float(lam_eff[i])) * nb))
        sa = 1 + torch.randperm(na, generator=generator)[:ka].to(dev)
        sb = 1 + torch.randperm(nb, generator=generator)[:kb].to(dev)
        keep_i = torch.cat([ai[:1], ai[sa], bi[sb], ai[-1:]])
        keep_p = torch.cat([ap[:1], ap[sa], bp[sb], ap[-1:]])
        ids.append(keep_i)
        pos.append(keep_p)
    L = max(len(t) for t in ids)
    ids_t = torch.full((B, L), pad_id, dtype=torch.long, device=dev)
    pos_t = torch.zeros((B, L), dtype=torch.long, device=dev)
    for i, (t, p) in enumerate(zip(ids, pos)):
        ids_t[i, :len(t)], pos_t[i, :len(p)] = t, p
    return dict(a, pixels=pix, patch_idx=pidx, ids=ids_t, pos=pos_t, labels_b=b["labels"], lam=lam_eff)
