"""One training step's batches and losses, as the phase loop (train.py) builds them: new samples whole
(or shown masked, --mask-new), and replayed exemplars from the memory collated once a phase, diversified
by mixup replay; each loss as one process of a torchrun job adds it; and after a phase, the head
trained alone on the memory (balanced_head). train.py re-exports every name."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import exmask
import models as M
from exemplars import MASKING
from memory import Memory


def to_device(t: torch.Tensor, device: str) -> torch.Tensor:
    """A host tensor to the device without waiting for the device (a copy from pageable memory
    would): pinned, then asynchronous."""
    return t.pin_memory().to(device, non_blocking=True) if device.startswith("cuda") else t


def masked_batch(data: dict, rows: torch.Tensor, m: dict, sel: torch.Tensor, pad: int, device: str,
                 lowres: int = 0, p: int = 0) -> dict:
    """New-phase samples `rows` shown as masked exemplars (mask sets m, at positions sel), batched as
    collate would batch them stored (lowres: made whole from their thumbnails, patch size p)."""
    b = exmask.masked_view(data["patches"][rows], data["ids"][rows], None if m["keep_idx"] is None else m["keep_idx"][sel],
                           None if m["keep"] is None else m["keep"][sel], pad, p, lowres)
    b["labels"] = data["labels"][rows]
    return {k: to_device(v, device) for k, v in b.items()}


def replay_batch(bank: dict, rows: torch.Tensor, cfg, method: str, pad: int, gen: torch.Generator) -> dict:
    """Exemplars `rows` (host) of the memory bank (memory_bank), batched on the device; for exmask and
    its ablations, diversified by mixup replay (cfg: a train.Config)."""
    B, dev = len(rows), cfg.device

    def take(r: torch.Tensor) -> dict:   # the caption length from the host copy: no wait for the device
        return exmask.take(bank["batch"], to_device(r, dev), pad, max(1, int(bank["lens"][r].max())))

    r = take(rows)
    if method in MASKING:
        if cfg.recombine > 0:   # a random partner of the same class
            partner = bank["starts"][rows] + (torch.rand(B, generator=gen) * bank["counts"][rows]).long()
            which = torch.rand(B, generator=gen) < cfg.recombine
            r = exmask.recombine(r, take(partner), to_device(which, dev), pad)
        if cfg.token_mixup > 0:
            other = torch.randint(len(bank["lens"]), (B,), generator=gen)
            mixed = torch.rand(B, generator=gen) < cfg.token_mixup
            lam = torch.where(mixed, torch.rand(B, generator=gen), torch.ones(B))
            r = exmask.token_mixup(r, take(other), lam, pad, gen)
    return r


def memory_bank(memory: Memory, pad: int, device: str, n_patches: int = 0) -> dict:
    """The whole memory collated once a phase, on the device: every step takes its rows from it.
    On the host: each row's caption length, and where its class's rows start and how many there are."""
    batch = exmask.collate(memory.items(), pad, n_patches=n_patches)
    counts = torch.tensor([len(v) for v in memory.classes.values()])
    group = torch.repeat_interleave(torch.arange(len(counts)), counts)                 # (M,) class of each row
    return {"batch": {k: v.to(device) for k, v in batch.items()}, "lens": (batch["ids"] != pad).sum(1),
            "starts": (counts.cumsum(0) - counts)[group], "counts": counts[group]}


HEAD_LR, HEAD_BATCH, HEAD_CHUNK = 1e-3, 64, 256   # balanced_head: Adam's step, rows a step, rows a forward pass


def balanced_head(model: M.TwoTower, memory: Memory, epochs: int, device: str, seed: int) -> None:
    """After a phase's exemplars are stored: `epochs` epochs of training the head alone on the memory,
    every seen class's exemplars as stored (the same bytes a class), the towers' features computed
    once (balanced fine-tuning, after EEIL). The phase fitted the head to many whole new rows and a
    few masked exemplars a class; this refits it on the balanced memory (masked, for the masking
    methods), so what the exemplars keep of the full image is what reaches the whole test images."""
    b = memory_bank(memory, model.cfg.text.pad_id, device, model.cfg.vit.n_patches)["batch"]
    keep = b.get("patch_keep")
    model.eval()
    z = []
    with torch.no_grad(), M.autocast(device):
        for i in range(0, len(b["labels"]), HEAD_CHUNK):
            s = slice(i, i + HEAD_CHUNK)
            z.append(model.head_input(model.features(b["pixels"][s], b["patch_idx"][s], b["ids"][s], b["pos"][s],
                                                     patch_keep=None if keep is None else keep[s])).float())
    z, y = torch.cat(z), b["labels"]                                                   # (M, F), (M,)
    opt = torch.optim.Adam(model.head.parameters(), lr=HEAD_LR)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for rows in torch.randperm(len(y), generator=gen).split(HEAD_BATCH):
            rows = rows.to(z.device)
            loss = F.cross_entropy(model.head(z[rows]), y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def row_ce(logits: torch.Tensor, r: dict) -> torch.Tensor:
    """Each row's cross-entropy (B,) against lam * y_a + (1 - lam) * y_b (plain CE where there is no lam)."""
    ce = F.cross_entropy(logits, r["labels"], reduction="none")
    if "lam" not in r:
        return ce
    lam = r["lam"]
    return lam * ce + (1 - lam) * F.cross_entropy(logits, r["labels_b"], reduction="none")


def mixed_ce(logits: torch.Tensor, r: dict) -> torch.Tensor:
    """The mean of row_ce."""
    return row_ce(logits, r).mean()


def logit_prior(counts: torch.Tensor, tau: float) -> torch.Tensor:
    """(C,) tau * log of each class's share of what a phase trains on, from counts (C,): how often
    each seen class is shown per epoch (a class never shown counts as shown once). Added to the
    logits of every training loss (the adjust of the losses below), so that the classifier learns
    the class-balanced posterior instead of the skewed one of new rows against a few exemplars, and
    evaluated without it: logit adjustment (Menon et al., 2021). tau = 0 gives zeros."""
    c = counts.float().clamp(min=1)
    return tau * (c / c.sum()).log()


def adjusted(logits: torch.Tensor, adjust: torch.Tensor | None) -> torch.Tensor:
    """Logits in fp32, with the training-time prior (logit_prior) added where there is one."""
    return logits.float() if adjust is None else logits.float() + adjust


def new_loss(model: M.TwoTower, data: dict, rows: torch.Tensor, device: str,
             adjust: torch.Tensor | None = None, with_logits: bool = False):
    """Cross-entropy of dataset rows `rows`, whole (with_logits: and their logits (n, C))."""
    x = to_device(data["patches"][rows], device)
    ids = exmask.trim_ids(data["ids"][rows], model.cfg.text.pad_id)   # the text tower skips the padding
    logits = model.forward_tokens(x, M.all_patches(x), to_device(ids, device))
    loss = F.cross_entropy(adjusted(logits, adjust), to_device(data["labels"][rows], device))
    return (loss, logits) if with_logits else loss


def consistency(masked: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """KL(softmax(whole) || softmax(masked)), the mean over rows: how far a masked view's prediction
    (B, C) is from its whole sample's (B, C), which it is pulled toward (no gradient reaches whole)."""
    return F.kl_div(masked.float().log_softmax(-1), whole.detach().float().log_softmax(-1), log_target=True,
                    reduction="batchmean")


def masked_and_replay(model: M.TwoTower, m: dict | None, r: dict | None, n_m: int, n_r: int, pad: int,
                      adjust: torch.Tensor | None = None) -> tuple:
    """A step's new rows shown masked (masked_batch, or None) and its replayed exemplars (replay_batch,
    or None) in one forward pass: both keep a share of the patches, so they batch together
    (exmask.concat) and the step runs one pass fewer than with each apart. -> (masked loss, replay
    loss, masked logits (n, C)), each loss as share() gives it, the sum over this process's rows
    divided by the step's n_m or n_r: a constant 0 where this process has none of the step's rows
    (under torchrun), None where the step has none."""
    parts = [b for b in (m, r) if b is not None and len(b["labels"])]
    per = logits = torch.zeros(0)
    if parts:
        j = exmask.concat(parts, pad)
        logits = model.forward_tokens(j["pixels"], j["patch_idx"], j["ids"], j["pos"], j.get("patch_keep"))
        per = row_ce(adjusted(logits, adjust), j)                                    # (n + R,)
    a = len(m["labels"]) if m is not None else 0
    return (per[:a].sum() / n_m if n_m else None, per[a:].sum() / n_r if n_r else None,
            logits[:a] if m is not None else None)


def share(n_mine: int, n_all: int, loss_of, *args) -> torch.Tensor:
    """A loss term as one process adds it: loss_of(*args), the mean over its n_mine of the step's
    n_all rows, times its share of them, so that the processes' terms sum to the mean over all the
    rows. One process (n_mine == n_all): the mean itself, untouched; no rows: a constant 0."""
    if n_mine == n_all:
        return loss_of(*args)
    return loss_of(*args) * (n_mine / n_all) if n_mine else torch.zeros(())
