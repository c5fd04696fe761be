"""The exemplar buffer: a byte budget, herding selection, per-class quotas, storage, stats.

The budget is counted in bytes, exactly: the sum of the arrays each exemplar stores (see
exmask.encode). Every seen class gets an equal share of the budget; its exemplars are kept in
herding order, so shrinking a class when new classes arrive drops its least representative ones.
Bytes used never exceed the budget.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

import exmask


# what a stored exemplar may hold (exmask.encode), as the checkpoint keeps it
KEYS = ("label", "pixels", "patch_bits", "ids", "pos_bits", "thumb")


def herd(feats: torch.Tensor, target: torch.Tensor | None = None):
    """iCaRL herding, lazily: feats (n, F) -> yields indices, each the one that brings the running
    mean of those chosen closest to the class mean (of target (n, F) where given: e.g. the full
    samples', while feats are what their masked exemplars keep). Stop when the budget is full: the
    cost is one pass over the class per exemplar taken, not per sample."""
    f = torch.nn.functional.normalize(feats.float(), dim=1)
    mu = f.mean(0) if target is None else torch.nn.functional.normalize(target.float(), dim=1).mean(0)
    acc = torch.zeros_like(mu)
    avail = torch.ones(len(f), dtype=torch.bool)
    for k in range(1, len(f) + 1):
        dist = ((mu - (acc + f) / k) ** 2).sum(1).masked_fill(~avail, float("inf"))
        i = int(dist.argmin())
        avail[i] = False
        acc += f[i]
        yield i


def within_quota(items: Iterable[dict], quota: int | None) -> list[dict]:
    """The leading exemplars of `items` (preference order) that fit in `quota` bytes together (None:
    all). Drawn lazily, so a costly source (herding, encoding) stops once the quota is full."""
    out, used = [], 0
    for ex in items:
        if quota is not None and used + exmask.nbytes(ex) > quota:
            break
        used += exmask.nbytes(ex)
        out.append(ex)
    return out


class Memory:
    """Exemplars per class, filled to `budget(n_seen_classes)` bytes.

    per_class_bytes > 0: the budget grows with the classes (M full exemplars' bytes each);
    total_bytes > 0: a fixed total shared by all seen classes; unlimited=True keeps everything
    (budget -1, quota None; the loop never builds one: `joint` trains on the data itself)."""

    def __init__(self, per_class_bytes: int = 0, total_bytes: int = 0, unlimited: bool = False):
        if not unlimited and (per_class_bytes > 0) == (total_bytes > 0):
            raise ValueError("give exactly one of per_class_bytes and total_bytes")
        self.per_class_bytes, self.total_bytes, self.unlimited = per_class_bytes, total_bytes, unlimited
        self.classes: dict[int, list[dict]] = {}

    # --- budget
    def budget(self, n_classes: int | None = None) -> int:
        n = len(self.classes) if n_classes is None else n_classes
        if self.unlimited:
            return -1
        return self.per_class_bytes * n if self.per_class_bytes else self.total_bytes

    def quota(self, n_classes: int) -> int | None:
        """Each class's share of the budget in bytes once n_classes are seen (None: unlimited, keep all)."""
        return None if self.unlimited else self.budget(n_classes) // max(n_classes, 1)

    def bytes_used(self) -> int:
        return sum(exmask.nbytes(ex) for items in self.classes.values() for ex in items)

    def __len__(self) -> int:
        return sum(len(v) for v in self.classes.values())

    # --- filling
    def add(self, candidates: dict[int, list[dict]]) -> None:
        """candidates: class -> exemplars in preference (herding) order. Adds the new classes, then
        trims every class to its equal share of the budget."""
        self.classes.update(candidates)
        if self.unlimited:
            return
        q = self.quota(len(self.classes))
        for c, items in self.classes.items():
            self.classes[c] = within_quota(items, q)

    def items(self) -> list[dict]:
        return [ex for items in self.classes.values() for ex in items]

    # --- report
    def stats(self) -> dict:
        flat = self.items()
        n = max(len(flat), 1)
        return {"budget_bytes": self.budget(), "bytes_used": self.bytes_used(), "exemplars": len(flat),
                "exemplars_per_class": len(flat) / max(len(self.classes), 1),
                "mean_kept_patches": sum(ex["pixels"].shape[0] for ex in flat if "pixels" in ex) / n,
                "mean_kept_tokens": sum(len(ex["ids"]) for ex in flat if "ids" in ex) / n}

    # --- checkpoint: tensors and plain values only
    def state_dict(self) -> dict:
        sd = {"per_class_bytes": self.per_class_bytes, "total_bytes": self.total_bytes,
              "unlimited": self.unlimited, "classes": list(self.classes), "counts": [len(v) for v in self.classes.values()]}
        flat = self.items()
        for key in KEYS:
            have = [ex[key] for ex in flat if key in ex]
            if have:
                sd[key] = torch.cat([t.reshape(-1) for t in have])
                sd[key + "_len"] = torch.tensor([t.numel() for t in have])
        if flat and "pixels" in flat[0]:
            sd["pixel_dim"] = flat[0]["pixels"].shape[-1]
        if flat and "thumb" in flat[0]:
            sd["thumb_shape"] = list(flat[0]["thumb"].shape)
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict) -> "Memory":
        mem = cls(sd["per_class_bytes"], sd["total_bytes"], sd["unlimited"])
        parts = {k: list(sd[k].split(sd[k + "_len"].tolist())) for k in KEYS if k in sd}
        i = 0
        for c, n in zip(sd["classes"], sd["counts"]):
            items = []
            for _ in range(n):
                ex = {k: v[i] for k, v in parts.items()}
                ex["label"] = ex["label"].reshape(())
                if "pixels" in ex:
                    ex["pixels"] = ex["pixels"].reshape(-1, sd["pixel_dim"])
                if "thumb" in ex:
                    ex["thumb"] = ex["thumb"].reshape(sd["thumb_shape"])
                items.append(ex)
                i += 1
            mem.classes[c] = items
        return mem
