"""Exemplar masking as pure functions of tensors (arXiv 2412.09549, with our reading of it in
shared/DESIGN.md).

  1. smooth_scores / keep_top: rank patches by the pooling query's attention in the image tower's
     last block (mean over heads), by default averaged over each patch's 3 x 3 neighbours, and keep
     the top share, in ascending patch order.
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


def sample_scores(scores: torch.Tensor, generator: torch.Generator, temperature: float = 1.0) -> torch.Tensor:
    """Gumbel keys: keep_top on them draws patches without replacement with probability proportional
    to score ** (1 / temperature) (scores > 0, e.g. attention)."""
    u = torch.rand(scores.shape, generator=generator).to(scores.device).clamp(1e-9, 1 - 1e-9)
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

def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(N,) bool -> (ceil(N / 8),) uint8, bit j of byte i set where mask[8 i + j]: a kept set of
    positions in N / 8 bytes (a list of indices costs a byte or more per kept position)."""
    m = F.pad(mask.to(torch.uint8), (0, -len(mask) % 8)).view(-1, 8)
    return (m << torch.arange(8, dtype=torch.uint8, device=mask.device)).sum(1).to(torch.uint8)


def unpack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(n,) uint8 -> the kept positions, ascending (K,) int64."""
    return ((bits[:, None] >> torch.arange(8, dtype=torch.uint8, device=bits.device)) & 1).flatten().nonzero().flatten()


def encode(patches: torch.Tensor | None, ids: torch.Tensor | None, label: int, vocab_size: int, pad_id: int,
           idx: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> dict:
    """One exemplar to store. patches (N, P) uint8, ids (L,) padded caption; None for a modality the
    model does not use (nothing of it is stored). idx (K,) kept patch indices or None (all kept:
    indices implied, not stored); keep (L,) bool kept tokens or None (all kept: positions implied).
    Kept positions are stored as bit masks (pack_bits)."""
    ex = {"label": torch.tensor(label, dtype=torch.int16)}
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


def collate(items: list[dict], pad_id: int, device="cpu") -> dict:
    """Stored exemplars -> a replay batch: pixels (B, K, P) uint8, patch_idx (B, K), ids (B, L)
    padded with pad_id, pos (B, L), labels (B,). All items must keep the same number of patches."""
    B = len(items)
    if "pixels" not in items[0]:    # a text-only model stores no image: an empty stand-in
        items = [dict(ex, pixels=torch.zeros(0, 1, dtype=torch.uint8)) for ex in items]
    if "ids" not in items[0]:       # an image-only model stores no caption: a pad token stands in
        items = [dict(ex, ids=torch.tensor([pad_id])) for ex in items]
    pixels = torch.stack([ex["pixels"] for ex in items])
    K = pixels.shape[1]
    if "patch_bits" in items[0]:
        pidx = torch.stack([unpack_bits(ex["patch_bits"]) for ex in items])
    else:
        pidx = torch.arange(K).expand(B, K)
    L = max(len(ex["ids"]) for ex in items)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    for i, ex in enumerate(items):
        n = len(ex["ids"])
        ids[i, :n] = ex["ids"].long()
        pos[i, :n] = unpack_bits(ex["pos_bits"]) if "pos_bits" in ex else torch.arange(n)
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
    caption tokens and fills the rest from b[i]'s, every token at its own original position and no
    position twice (where b's patch sits where a's already is, another of a's fills the slot).
    The label becomes lam'*y_a + (1-lam')*y_b, lam' the share of a's patches actually taken;
    returned as labels (a), labels_b and lam (B,)."""
    B, K, P = a["pixels"].shape
    dev = a["pixels"].device
    k_a = (lam * K).round().long().clamp(0, K)                                        # (B,)
    # candidates in preference order: a's first k_a (random order), then b's, then the rest of a's
    take_a = torch.rand(B, K, generator=generator).to(dev).argsort(1)                 # (B, K)
    take_b = torch.rand(B, K, generator=generator).to(dev).argsort(1)
    pix = torch.cat([a["pixels"].gather(1, take_a[..., None].expand(-1, -1, P)),
                     b["pixels"].gather(1, take_b[..., None].expand(-1, -1, P))], 1)   # (B, 2K, P)
    pidx = torch.cat([a["patch_idx"].gather(1, take_a), b["patch_idx"].gather(1, take_b)], 1)  # (B, 2K)
    j = torch.arange(K, device=dev)
    prio = torch.cat([torch.where(j[None] < k_a[:, None], 0, 2), torch.ones(B, K, dtype=torch.long, device=dev)], 1)
    order = (prio * 2 * K + torch.arange(2 * K, device=dev)).argsort(1)               # (B, 2K), stable
    pidx, from_a = pidx.gather(1, order), order < K
    # the first occurrence of each position survives; a alone has K distinct ones, so K always do
    onehot = F.one_hot(pidx, int(pidx.max()) + 1)                                     # (B, 2K, N)
    first = (onehot.cumsum(1) * onehot).sum(-1) == 1                                  # (B, 2K)
    rank = first.cumsum(1)
    pick = (first & (rank <= K)).float().argsort(dim=1, descending=True, stable=True)[:, :K]  # (B, K)
    src_pos = order.gather(1, pick)                                                    # into the 2K candidates
    pix = pix.gather(1, src_pos[..., None].expand(-1, -1, P))
    pidx_out = pidx.gather(1, pick)
    lam_eff = from_a.gather(1, pick).float().mean(1)                                   # (B,)
    # text: a's pooling and end tokens stay; content tokens shared out by lam_eff, positions distinct
    ids, pos = [], []
    for i in range(B):
        ra_, rb_ = a["ids"][i] != pad_id, b["ids"][i] != pad_id
        ai, ap = a["ids"][i][ra_], a["pos"][i][ra_]
        bi, bp = b["ids"][i][rb_], b["pos"][i][rb_]
        na = max(0, len(ai) - 2)
        ka = int(round(float(lam_eff[i]) * na))
        sa = 1 + torch.randperm(na, generator=generator)[:ka].to(dev)
        taken = torch.cat([ap[:1], ap[sa], ap[-1:]])
        free = 1 + (~torch.isin(bp[1:-1], taken)).nonzero().flatten() if len(bi) > 2 else torch.zeros(0, dtype=torch.long, device=dev)
        kb = min(len(free), int(round((1 - float(lam_eff[i])) * max(0, len(bi) - 2))))
        sb = free[torch.randperm(len(free), generator=generator)[:kb].to(dev)]
        ids.append(torch.cat([ai[:1], ai[sa], bi[sb], ai[-1:]]))
        pos.append(torch.cat([ap[:1], ap[sa], bp[sb], ap[-1:]]))
    L = max(len(t) for t in ids)
    ids_t = torch.full((B, L), pad_id, dtype=torch.long, device=dev)
    pos_t = torch.zeros((B, L), dtype=torch.long, device=dev)
    for i, (t, p) in enumerate(zip(ids, pos)):
        ids_t[i, :len(t)], pos_t[i, :len(p)] = t, p
    return dict(a, pixels=pix, patch_idx=pidx_out, ids=ids_t, pos=pos_t, labels_b=b["labels"], lam=lam_eff)
