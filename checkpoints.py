"""A run's files: the per-phase checkpoint (what --resume and --continue read, and what makes a run
the same run: RUN_KEYS), and the finished model (model.pt, tokenizer, labels.json). Tensors and plain
values only. train.py re-exports every name here."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict

import torch

import data as D
import models as M


def checkpoint_path(out: str) -> str:
    return os.path.join(out, "checkpoint.pt")


def save_checkpoint(path: str, ck: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    D.write_atomic(path, lambda tmp: torch.save(ck, tmp))


# what --resume must find unchanged in a checkpoint (the masking settings decide the memory's contents)
RUN_KEYS = ("seed", "phases", "first_phase", "memory_per_class", "memory_bytes", "keep_image", "keep_text",
            "image_mask", "mask_candidates", "smooth_image", "context_weight", "recombine", "token_mixup",
            "mask_new", "replay", "val", "epochs", "batch_size", "lr", "lowres", "herding", "logit_adjust",
            "mask_new_rule", "consistency", "adjust_views", "fill", "replay_passes", "balanced_head")


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """A short hash of named tensors: their names, dtypes, shapes and bytes."""
    h = hashlib.blake2b(digest_size=8)
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}:{t.dtype}:{tuple(tensors[k].shape)};".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def data_identity(cfg) -> str:
    """A short hash of the data a run trains and is measured on: the manifest's bytes, or the embedded
    data's settings, and a continued run's --eval-data manifest where it has one (the images
    themselves are checked by the image cache, data.read_manifest)."""
    h = hashlib.blake2b(digest_size=8)

    def add_file(path: str) -> None:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    if cfg.data:
        add_file(cfg.data)
    else:
        h.update(json.dumps(asdict(cfg.synth), sort_keys=True).encode())
    if getattr(cfg, "eval_data", ""):   # after a marker: a run without it keeps the hash it always had
        h.update(b"\0eval:")
        add_file(cfg.eval_data)
    return h.hexdigest()


def run_identity(cfg, method: str, data: dict, mcfg: M.ModelConfig, backbone: dict | None = None) -> dict:
    """The settings a checkpoint was made with, as plain values: RUN_KEYS, the classes, the towers'
    shapes, and hashes of the data and of the towers' frozen weights (backbone, where given)."""
    run = {"method": method, **{k: getattr(cfg, k) for k in RUN_KEYS}, "classes": list(data["class_names"]),
           "towers": json.loads(json.dumps(asdict(mcfg))), "data": data_identity(cfg)}
    if backbone is not None:
        run["backbone"] = digest(backbone)
    return run


# Identity entries recorded since 2026-11-29: a checkpoint written before then lacks them and is trusted.
LATER = ("data", "backbone")


# Settings whose default changed when they were first recorded: a checkpoint written before then does
# not name them and was made with this value, not with today's default.
UNRECORDED = {"logit_adjust": 0.0, "adjust_views": False, "balanced_head": 0}


def load_checkpoint(path: str, run: dict, defaults: dict | None = None) -> dict:
    """A checkpoint to resume from, refused (one error line) where it is unreadable or was made with
    other settings than `run` (run_identity), saying which. defaults: each setting's default, what a
    checkpoint written before that setting existed was made with (UNRECORDED overrides it)."""
    defaults = {**(defaults or {}), **UNRECORDED}
    try:
        ck = torch.load(path, weights_only=True)
    except Exception as e:   # truncated, corrupt, or not ours: say how to start over
        raise SystemExit(f"error: cannot read checkpoint {path} ({type(e).__name__}); delete it (or run without "
                         "--resume) to start this method over") from None
    old = ck.get("run")
    if old is None:
        raise SystemExit(f"error: checkpoint {path} was made by an older version; delete it to start over")
    for k, v in run.items():
        if k in LATER and k not in old:
            continue
        if old.get(k, defaults.get(k)) != v:
            what = {"classes": "the classes or their order",
                    "data": "data (the manifest or the embedded data's settings, or --eval-data)",
                    "backbone": "backbone (the towers' frozen weights)"}.get(k, k)
            shown = "" if k in ("classes", "towers", "data", "backbone") else f": {old.get(k)!r} there, {v!r} now"
            raise SystemExit(f"error: --resume: {path} was made with another {what}{shown}; resume with the same "
                             "settings, or use another --out (or delete it) to start over")
    return ck


def save_model(folder: str, model: M.TwoTower, class_names: list[str], tok) -> None:
    """The final classifier, for export.py: model.pt (config + full state, adapters unmerged),
    the tokenizer and labels.json beside it."""
    os.makedirs(folder, exist_ok=True)
    save_checkpoint(os.path.join(folder, "model.pt"),
                    {"model_config": asdict(model.cfg), "state": {k: v.cpu() for k, v in model.state_dict().items()},
                     "class_names": class_names})
    D.write_atomic(os.path.join(folder, D.tokenizer_filename(tok)), tok.save)
    D.write_json(os.path.join(folder, "labels.json"), class_names)
