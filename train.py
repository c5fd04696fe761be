"""Multimodal class-incremental training: the phase loop, evaluation, checkpoints (a step's batches
and losses are in replay.py, a run's figures in scores.py, its data and the checks before it trains
in rundata.py).

    python train.py                                    # embedded default, method exmask
    python train.py --methods finetune,replay,joint    # several methods side by side
    python train.py --data my/manifest.csv --phases 10 --memory-per-class 5
    python train.py --continue runs/a/exmask --data new.csv --out runs/b   # new classes later (extend.py)
    torchrun --standalone --nproc_per_node 2 train.py --data my/manifest.csv   # one job, 2 processes (ranks.py)

From Python (a notebook): `from train import Config, train; results = train(Config(phases=5))`.

Methods share one harness: `finetune` (no memory), `replay` (full exemplars), `exmask` (masked
exemplars, optionally mixup replay) and its ablations, `joint` (every sample of every seen class kept: the
upper bound). The towers stay frozen; adapters and the head are trained. Each epoch trains on
the new classes' data and replays every stored exemplar once beside it (--replay epoch).

Under torchrun every process draws the same steps and forwards its shard of each (--batch-size is
the global batch, split), the gradients are summed (ranks.all_reduce_grads), exemplars are chosen and
masked by the first process and broadcast, evaluation is sharded and summed, and only the first
process writes files and shows progress. One process runs exactly as without torchrun.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, replace

import torch

import data as D
import exmask
import models as M
import ranks
from exemplars import IMAGE_MASKS, MASKING, candidates, draw_noise, mask_sets, masks_anything
from memory import Memory
from models import autocast
from pictures import draw_accuracy, draw_masked
from scores import metrics, show, summarize   # re-exported: train.metrics, train.show, train.summarize
from rundata import (SAME_AT_WHOLE_TEXT, Patches, check_methods, check_phases, data_name,  # noqa: F401 (re-exported)
                     check_processes, prepare, read_data)
from towers import PretrainConfig, backbone, console, progress

METHODS = ("finetune", "replay", "joint", *MASKING)

@dataclass
class Config:
    data: str = ""                          # manifest (CSV/JSONL); "" = the embedded default
    methods: str = "exmask"                 # comma-separated, see METHODS
    phases: int = 10
    first_phase: int = 0                    # classes in the first phase; 0 = an even split
    memory_per_class: float = 5.0           # budget in full exemplars' bytes per seen class
    memory_bytes: int = 0                   # or a fixed total budget in bytes (overrides)
    keep_image: float = 0.05                # share of image patches a masked exemplar keeps (a class with too few
                                            # rows to fill its quota: see fill); chosen on
                                            # validation rows of the real-image sets (with adjust_views, 5 % beat 10 %;
                                            # before it, 10 % beat 5, 15, 20, 30 and 50 %)
    lowres: int = 0                         # > 0: a masked exemplar also stores its whole image at 1/lowres of its
                                            # side, and replays whole, its kept patches sharp (after CIM); 0 = off
    keep_text: float = 1.0                  # share of caption tokens kept (special tokens always); 1 = the text
                                            # is stored whole: on short captions masking it cost accuracy
    image_mask: str = "feature"             # exmask's patch rule, one of IMAGE_MASKS (see image_keep); chosen
                                            # on validation rows of the real-image development set
    herding: str = "full"                   # masked methods: herd on the full samples' features ("full") or on
                                            # their masked exemplars', toward the full class mean ("masked")
    fill: str = "patches"                   # masked methods, a class whose rows all fit with bytes to spare: more
                                            # patches per exemplar ("patches", exmask.fill_keep) or more masked
                                            # copies of each row at keep_image, each keeping other patches
                                            # ("copies": more accurate on the real icons, 1.3-1.6x the time)
    mask_candidates: int = 8                # random masks the "class" and "feature" rules choose from
    smooth_image: int = 3                   # patch scores: attention averaged over k x k patches (1 = raw)
    context_weight: float = 1.0             # weight of the cross-modal context term in text scores
    recombine: float = 0.0                  # share of replayed exemplars given a same-class partner's text
    token_mixup: float = 0.0                # share of replayed exemplars token-mixed with another exemplar
    mask_new: float = 1.0                   # share of new samples also shown masked (exmask family), beside their
                                            # whole view: old classes are only ever seen masked, and without it a
                                            # model learns "masked means old" where classes have many rows
    mask_new_rule: str = "method"           # the new samples' masked views: masked as the method masks its exemplars
                                            # ("method") or at random ("random": random-mask's rule, the same share)
    consistency: float = 0.0                # weight of a term pulling each new sample's masked view's prediction
                                            # toward its whole view's (replay.consistency; with mask_new > 0)
    logit_adjust: float = 1.0               # > 0: while training, every logit is shifted by this times the log of
                                            # its class's share of the phase's rows (replay.logit_prior), so that
                                            # many new rows against few exemplars do not bias the head; 0 = off
                                            # (both chosen on validation rows of the real-image sets)
    adjust_views: bool = True               # masked methods: one prior for whole views (new rows only) and one for
                                            # masked views (masked new rows, exemplars), each shifting its own rows'
                                            # logits, instead of one for all: "whole" never says "new" to the head
    replay: str = "epoch"                   # "epoch": every exemplar once per epoch beside the new data (iCaRL);
                                            # "batch": a batch of batch_size exemplars drawn each step
    replay_passes: int = 1                  # epoch replay: every exemplar this many times per epoch, the passes
                                            # shuffled together (more steps where a step's replay would pass
                                            # REPLAY_MAX); chosen on validation rows, see the README
    balanced_head: int = 2                  # after each phase, this many epochs of training the head alone on the
                                            # memory (replay.balanced_head; 0 = off); chosen on validation rows
    val: float = 0.0                        # > 0: carve this share of each class's training rows as a validation
                                            # split and report on it instead of the test rows (to choose settings)
    seed: int = 0
    seeds: str = ""                         # e.g. "0,1,2": every method once per seed, reported as mean ± std
    epochs: int = 3
    batch_size: int = 32
    lr: float = 0.01
    device: str = ""                        # "" = cuda when available, else cpu
    out: str = ""                           # "" = runs/<data name>
    resume: bool = False
    export: bool = True                     # write model.onnx at the end (export.py)
    compile: bool = False                   # torch.compile the towers' forward (models.compile_towers)
    model: M.ModelConfig = field(default_factory=M.ModelConfig)
    synth: D.SynthConfig = field(default_factory=D.SynthConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    cache_dir: str = ""                     # "" = $EXMASK_CACHE or ~/.cache/exmask
    vit: str = ""                           # a timm ViT name: its pretrained weights replace the default image tower
    vit_file: str = ""                      # local weights for --vit (else timm fetches them)
    text_model: str = ""                    # a BERT-family folder (config.json, model.safetensors, vocab.txt)
    clip: str = ""                          # a CLIP or SigLIP checkpoint (folder or file): both towers and its tokenizer
    quiet: bool = False
    dist_timeout: float = 1800.0            # under torchrun: seconds a process waits in a collective (for the
                                            # others) before the job ends with an error; the first process alone
                                            # pretrains the towers and decodes the images while the others wait
    continue_from: str = ""                 # a finished run's folder: learn `data`'s new classes after it (extend.py)
    new_phases: int = 1                     # with continue_from: the phases the new classes are learned in
    eval_data: str = ""                     # with continue_from: the run's own manifest, its old classes' test rows
                                            # measured too (forgetting)

    def __post_init__(self):
        bad = [m for m in self.method_list if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
        if self.consistency < 0:
            raise ValueError(f"consistency is a loss weight and must be 0 (off) or more, got {self.consistency}")
        if self.logit_adjust < 0:
            raise ValueError(f"logit_adjust scales a log prior and must be 0 (off) or more, got {self.logit_adjust}")
        for k in ("keep_image", "keep_text", "recombine", "token_mixup", "mask_new"):
            if not 0 <= getattr(self, k) <= 1:
                raise ValueError(f"{k} is a share and must lie in [0, 1], got {getattr(self, k)}")
        if self.memory_bytes < 0 or (not self.memory_bytes and self.memory_per_class <= 0):
            raise ValueError("the memory budget must be positive (--memory-per-class or --memory-bytes)")
        if self.lowres < 0:
            raise ValueError(f"lowres is a downscaling factor (2, 4, 8, ...; 0 = off), got {self.lowres}")
        if self.smooth_image < 1 or self.smooth_image % 2 == 0:
            raise ValueError(f"smooth_image must be an odd number of patches (1 = off), got {self.smooth_image}")
        if self.mask_new_rule not in ("method", "random"):
            raise ValueError(f"mask_new_rule must be 'method' or 'random', got {self.mask_new_rule!r}")
        if self.mask_candidates < 1:
            raise ValueError(f"mask_candidates must be at least 1, got {self.mask_candidates}")
        if self.image_mask not in IMAGE_MASKS:
            raise ValueError(f"image_mask must be one of {', '.join(IMAGE_MASKS)}, got {self.image_mask!r}")
        if not 0 <= self.val < 1:
            raise ValueError(f"val is a share of the training rows and must lie in [0, 1), got {self.val}")
        if self.herding not in ("full", "masked"):
            raise ValueError(f"herding must be 'full' or 'masked', got {self.herding!r}")
        if self.fill not in ("patches", "copies"):
            raise ValueError(f"fill must be 'patches' or 'copies', got {self.fill!r}")
        if self.replay not in ("epoch", "batch"):
            raise ValueError(f"replay must be 'epoch' or 'batch', got {self.replay!r}")
        if self.replay_passes < 1 or (self.replay_passes > 1 and self.replay != "epoch"):
            raise ValueError(f"replay_passes counts passes over the memory per epoch (replay 'epoch'): at least 1, "
                             f"got {self.replay_passes} with replay {self.replay!r}")
        if self.balanced_head < 0:
            raise ValueError(f"balanced_head counts epochs (0 = off), got {self.balanced_head}")
        if self.phases < 1 or self.epochs < 1 or self.batch_size < 1 or self.new_phases < 1:
            raise ValueError("phases, epochs and batch size must be at least 1")
        if self.dist_timeout <= 0:
            raise ValueError(f"dist_timeout is in seconds and must be positive, got {self.dist_timeout}")
        if self.vit_file and not self.vit:
            raise ValueError("vit_file (--vit-file) holds the weights of --vit NAME: give --vit too")
        if self.eval_data and not self.continue_from:
            raise ValueError("eval_data measures a continued run's old classes: it needs continue_from")

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: M.TwoTower, data: dict, phase_cls: list[list[int]], t: int, device: str, bs: int = 256):
    """Accuracy (%) and sample count on the test data of each phase 0..t (None, 0 for a phase
    without test rows: only a continued run's old classes, without --eval-data)."""
    model.eval()
    phase_of = torch.full((len(data["class_names"]),), -1, dtype=torch.long)   # each class's phase
    for j in range(t + 1):
        phase_of[phase_cls[j]] = j
    idx = (data["is_test"] & (phase_of[data["labels"]] >= 0)).nonzero().flatten()   # every phase's rows at once
    right = torch.zeros(t + 1, dtype=torch.long)
    for b in ranks.shard(idx).split(bs):         # under torchrun each process measures its share
        x = data["patches"][b].to(device)
        ids = exmask.trim_ids(data["ids"][b], model.cfg.text.pad_id)
        with autocast(device):
            logits = model.forward_tokens(x, M.all_patches(x), ids.to(device))
        right.index_add_(0, phase_of[data["labels"][b]], (logits.argmax(1).cpu() == data["labels"][b]).long())
    cnt = torch.bincount(phase_of[data["labels"][idx]], minlength=t + 1).tolist()
    right = ranks.sum_ints(right.tolist())
    return [100.0 * c / n if n else None for c, n in zip(right, cnt)], cnt


# ----------------------------------------------------------------------------- memory

REPLAY_MAX = 256        # most exemplars replayed in one step (epoch mode); a larger memory gets more steps


from replay import (  # noqa: E402,F401  (re-exported: tests and benchmarks patch train.replay_batch etc.)
    balanced_head, consistency, logit_prior, masked_and_replay, masked_batch, memory_bank, mixed_ce, new_loss, replay_batch, row_ce,
    share, to_device)


# ----------------------------------------------------------------------------- one method

from checkpoints import (  # noqa: E402,F401  (re-exported: train.RUN_KEYS etc.)
    RUN_KEYS, checkpoint_path, load_checkpoint, run_identity, save_checkpoint, save_model)


def run_method(cfg: Config, method: str, data: dict, mcfg: M.ModelConfig, backbone: dict, tok, con,
               phase_cls: list[list[int]] | None = None, start_from: dict | None = None) -> dict:
    """One method through every phase. A continued run (extend.py) passes its own phase schedule and
    start_from, the finished run's checkpoint: it goes on from there as --resume goes on from its own."""
    device = cfg.device
    phase_cls = phase_cls or D.phase_classes(list(range(len(data["class_names"]))), cfg.phases, cfg.first_phase)
    torch.manual_seed(cfg.seed)
    model = M.TwoTower(mcfg).to(device)
    missing = set(model.backbone_state()) - set(backbone)
    if missing:
        raise ValueError(f"backbone lacks {sorted(missing)[:5]}")
    model.load_state_dict(backbone, strict=False)
    model.freeze_backbone()
    if cfg.compile:
        M.compile_towers(model)
    unit = exmask.full_bytes(mcfg.vit.n_patches, data["patches"].shape[-1], mcfg.text.context, mcfg.text.vocab_size,
                             model.use_image, model.use_text)
    # finetune keeps nothing; joint trains on the data itself (every seen class), not on a memory
    memory = (None if method in ("finetune", "joint") else
              Memory(total_bytes=cfg.memory_bytes) if cfg.memory_bytes else
              Memory(per_class_bytes=int(cfg.memory_per_class * unit)))
    R, counts, secs, mem_stats, start = [], [], [], [], 0
    ck_path = checkpoint_path(cfg.out)   # cfg.out: this method's own folder
    run = run_identity(cfg, method, data, mcfg, backbone)
    ck = (load_checkpoint(ck_path, run, {k: getattr(Config(), k) for k in RUN_KEYS})
          if cfg.resume and os.path.exists(ck_path) else start_from)
    if ck is not None:
        model.grow(ck["n_classes"])
        model.load_state_dict(ck["trainable"], strict=False)
        memory = Memory.from_state_dict(ck["memory"]) if ck["memory"] else None
        R, counts, secs, mem_stats = ck["R"], ck["counts"], ck["secs"], ck["mem_stats"]
        start = len(R)
        con.print(f"[{method}] {'continued' if ck is start_from else 'resumed'} after phase {start}/{cfg.phases}")
    n_params = None
    for t in range(start, cfg.phases):
        t0 = time.time()
        torch.manual_seed(cfg.seed * 1000 + t)
        rng = random.Random(cfg.seed * 1000 + t)
        model.grow(len(phase_cls[t]))
        model.freeze_backbone()
        n_params = model.trainable_params()
        seen = [c for p in phase_cls[:t + 1] for c in p]
        with M.loop_attention(device):   # SDPA without cuDNN's per-shape plans on a GPU (models.LOOP_SDPA)
            # joint, the upper bound: every training sample of every seen class, together
            train_phase(cfg, model, data, seen if method == "joint" else phase_cls[t], memory, method, rng, con,
                        f"[{method}] phase {t + 1}/{cfg.phases}")
            if memory is not None:
                gen = torch.Generator().manual_seed(cfg.seed * 1000 + t)
                # under torchrun: chosen and masked once, by the first process; every process stores them
                # fill for a class's share in the last phase (a fixed total budget shrinks it as classes come)
                last = memory.quota(sum(map(len, phase_cls)))
                cands, shown = (candidates(model, data, phase_cls[t], method, cfg, gen,
                                           memory.quota(len(memory.classes) + len(phase_cls[t])), last)
                                if ranks.is_main() else (None, []))
                memory.add(ranks.broadcast(cands))
                if cfg.balanced_head and len(memory):   # every process alike: the same memory, features and seed
                    balanced_head(model, memory, cfg.balanced_head, device, cfg.seed)
                if t == 0 and shown:
                    draw_masked(os.path.join(cfg.out, "masked_exemplars.png"), shown, mcfg.vit.patch_size,
                                tok, data["class_names"])
            row, cnt = evaluate(model, data, phase_cls, t, device)
        R.append(row)
        counts.append(cnt)
        secs.append(time.time() - t0)
        mem_stats.append(memory.stats() if memory is not None else joint_stats(data, seen, model) if method == "joint" else {})
        acc = sum(r * n for r, n in zip(row, cnt) if r is not None) / sum(cnt)
        measured = sum(len(c) for c, r in zip(phase_cls, row) if r is not None)
        con.print(f"[{method}] phase {t + 1}/{cfg.phases}: accuracy {acc:.1f}% on {measured} classes, "
                  f"{secs[-1]:.1f}s" + (f", memory {len(memory)} exemplars, {memory.bytes_used():,} B"
                                         if memory is not None else ""))
        if ranks.is_main():   # every process holds the same weights and memory: the first one writes them
            trainable = {k: v.detach().cpu() for k, v in model.named_parameters() if v.requires_grad}
            save_checkpoint(ck_path, {"run": run, "n_classes": model.n_classes, "trainable": trainable,
                                      "classes_per_phase": [len(c) for c in phase_cls],
                                      "memory": memory.state_dict() if memory is not None else {},
                                      "R": R, "counts": counts, "secs": secs, "mem_stats": mem_stats})
    res = {"method": method, "seed": cfg.seed, "phases": cfg.phases,
           "classes_per_phase": [len(c) for c in phase_cls], "accuracy_matrix": R, **metrics(R, counts),
           "phase_seconds": secs, "trainable_params": n_params or model.trainable_params(),
           "adapter": mcfg.adapter, "modalities": mcfg.modalities,
           "memory": mem_stats[-1] if mem_stats[-1] else {"budget_bytes": 0, "bytes_used": 0, "exemplars": 0,
                                                            "exemplars_per_class": 0, "mean_kept_patches": 0,
                                                            "mean_kept_tokens": 0},
           "memory_per_phase": mem_stats,
           # under torchrun the step's batch (--batch-size) is split over the processes: the same run for any N
           "world_size": ranks.world_size(), "global_batch_size": cfg.batch_size}
    return res, model


def joint_stats(data: dict, seen: list[int], model: M.TwoTower) -> dict:
    """joint keeps no memory: its "memory" figures describe the training data it trains on."""
    rows = data["is_train"] & torch.isin(data["labels"], torch.tensor(seen))
    n = int(rows.sum())
    return {"budget_bytes": -1, "bytes_used": 0, "exemplars": n, "exemplars_per_class": n / max(len(seen), 1),
            "mean_kept_patches": data["patches"].shape[1] * model.use_image,
            "mean_kept_tokens": float((data["ids"][rows] != model.cfg.text.pad_id).sum(1).float().mean()) * model.use_text}


def epoch_plan(n_new: int, n_mem: int, batch: int) -> tuple[int, int, int]:
    """Steps per epoch, new samples per step, exemplars replayed per step (epoch mode): every new
    sample and every exemplar once per epoch, at most REPLAY_MAX exemplars a step; a memory that
    needs more gets more, smaller steps (and replay-only ones where the new data runs out)."""
    steps = math.ceil(n_new / batch)
    if n_mem > steps * REPLAY_MAX:
        steps = math.ceil(n_mem / REPLAY_MAX)
        batch = max(1, math.ceil(n_new / steps))
    return steps, batch, math.ceil(n_mem / steps)


def phase_plan(cfg: Config, n_new: int, n_mem: int) -> tuple[int, int, int]:
    """epoch_plan for a phase of n_new new rows and n_mem exemplars as cfg replays them (epoch replay:
    every exemplar replay_passes times an epoch; batch replay: none in the plan)."""
    return epoch_plan(n_new, n_mem * cfg.replay_passes if cfg.replay == "epoch" else 0, cfg.batch_size)


def train_phase(cfg: Config, model: M.TwoTower, data: dict, classes: list[int], memory: Memory | None,
                method: str, rng: random.Random, con, desc: str) -> None:
    """Epochs over the new classes' training data; each step also replays exemplars from memory."""
    device, pad = cfg.device, model.cfg.text.pad_id
    idx = (data["is_train"] & torch.isin(data["labels"], torch.tensor(classes))).nonzero().flatten()
    n_mem = len(memory) if memory is not None else 0
    bank = memory_bank(memory, pad, device, model.cfg.vit.n_patches) if n_mem else None
    per_epoch, B, per_step = phase_plan(cfg, len(idx), n_mem)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, foreach=True)   # one op per step for all tensors (CPU defaults to a loop)
    steps = cfg.epochs * per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    masked_new = None
    rule = method if cfg.mask_new_rule == "method" else "random-mask"
    if method in MASKING and n_mem and cfg.mask_new > 0 and masks_anything(model, rule, cfg):
        # old classes are replayed masked; show the new ones masked too (a share of the time), so
        # that "masked" never stands for "old class" and both feature distributions meet (where the
        # rule masks nothing, e.g. whole captions on a text-only model, a view would be a duplicate)
        noise = draw_noise(len(idx), data["patches"].shape[1], data["ids"].shape[1], gen, rule, cfg)
        # under torchrun: masked once, by the first process (every process draws the noise, so that
        # all of them go on drawing the same numbers from gen)
        masked_new = ranks.broadcast(mask_sets(model, data, idx, rule, cfg, noise) if ranks.is_main() else None)
    adjust = adjust_masked = None
    if cfg.logit_adjust > 0:   # how often each seen class is shown per epoch: new rows (and their masked views), exemplars
        n_whole = torch.bincount(data["labels"][idx], minlength=model.n_classes).float()
        n_masked = n_whole * (cfg.mask_new if masked_new is not None else 0)
        if n_mem:
            kept = torch.tensor([len(memory.classes.get(c, ())) for c in range(model.n_classes)], dtype=torch.float)
            # batch replay: the replayed half of each step's loss weighs as much as the new half, so
            # the exemplars together count as the new rows and their masked views do
            n_masked = n_masked + (kept * cfg.replay_passes if cfg.replay == "epoch" else
                                   kept * (float(n_whole.sum() + n_masked.sum()) / n_mem))
        if cfg.adjust_views and method in MASKING and n_mem:   # each view its own prior (exemplars are masked)
            adjust = to_device(logit_prior(n_whole, cfg.logit_adjust), device)
            adjust_masked = to_device(logit_prior(n_masked, cfg.logit_adjust), device)
        else:
            adjust = adjust_masked = to_device(logit_prior(n_whole + n_masked, cfg.logit_adjust), device)
    model.train()
    with progress(con) as bar:
        task = bar.add_task(desc, total=steps)
        for _ in range(cfg.epochs):
            order = list(range(n_mem if cfg.replay == "epoch" else 0)) * cfg.replay_passes
            rng.shuffle(order)                      # each exemplar replay_passes times per epoch, spread over its steps
            order = torch.tensor(order, dtype=torch.long)
            new = torch.randperm(len(idx)).split(B)     # positions in idx
            for s in range(per_epoch):
                p = new[s] if s < len(new) else idx[:0]
                b = idx[p]
                # the step's rows (b, sel, rows) are drawn whole on every process alike; under torchrun
                # each process forwards its shard of them (ranks.shard) and adds its share of the loss
                loss, n = None, 0
                with autocast(device):
                    tie = cfg.consistency > 0 and masked_new is not None   # one process only (train checks)
                    whole = None
                    if len(b):
                        mine = ranks.shard(b)
                        loss = share(len(mine), len(b), new_loss, model, data, mine, device, adjust, tie)
                        loss, whole = loss if tie else (loss, None)
                        n = len(b)
                    drawn = (torch.rand(len(p), generator=gen) < cfg.mask_new if masked_new is not None else
                             torch.zeros(len(p), dtype=torch.bool))
                    sel = p[drawn]
                    rows = (order[s * per_step:(s + 1) * per_step] if cfg.replay == "epoch" else
                            torch.randint(n_mem, (cfg.batch_size,), generator=gen) if n_mem else order)
                    # the new rows shown masked and the replayed exemplars: one forward pass
                    mine = ranks.shard(sel)
                    mb = masked_batch(data, idx[mine], masked_new, mine, pad, device, cfg.lowres,
                                      model.cfg.vit.patch_size) if len(mine) else None
                    rb = ranks.shard_batch(replay_batch(bank, rows, cfg, method, pad, gen)) if len(rows) else None
                    lm, lr_, mlogits = masked_and_replay(model, mb, rb, len(sel), len(rows), pad, adjust_masked)
                    if len(sel):
                        if tie:   # each masked view pulled toward its own whole view's prediction
                            lm = lm + cfg.consistency * consistency(mlogits, whole[drawn])
                        loss = lm if loss is None else (loss * n + lm * len(sel)) / (n + len(sel))
                        n += len(sel)
                    if len(rows):
                        if loss is None:
                            loss = lr_
                        elif cfg.replay == "batch":   # old and new weigh the same, whatever their numbers
                            loss = (loss + lr_) / 2
                        else:                       # every sample weighs the same: training on new data + memory
                            loss = (loss * n + lr_ * len(rows)) / (n + len(rows))
                opt.zero_grad(set_to_none=True)
                if loss.requires_grad:   # a process whose shards of the step are all empty adds nothing
                    loss.backward()
                ranks.all_reduce_grads(params)   # one process: nothing to do
                opt.step()
                sched.step()
                bar.advance(task)


# ----------------------------------------------------------------------------- the whole job

def train(cfg: Config = Config()) -> list[dict]:
    """Run every method in cfg.methods on the same data and backbone; write <out>/results.json.
    Started by torchrun, the processes run it together (ranks.py): only the first writes and shows."""
    cfg = replace(cfg, device=cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no GPU is visible to PyTorch")
    cfg = replace(cfg, device=ranks.setup(cfg.device, cfg.dist_timeout))   # one process: as given
    check_processes(cfg)
    cfg = replace(cfg, quiet=cfg.quiet or not ranks.is_main())
    con = console(cfg)
    cfg = replace(cfg, out=cfg.out or os.path.join("runs", data_name(cfg.data)))
    if cfg.continue_from:   # new classes after a finished run: its own file
        import extend
        return extend.continue_run(cfg, con)
    # every problem with the data or the phase split, in one line, before any long work
    seeds = [int(x) for x in cfg.seeds.split(",")] if cfg.seeds else [cfg.seed]
    if cfg.data:
        _, names, labels, is_test = D.manifest_table(cfg.data)
        check_phases(cfg, seeds, names, labels, D.carve_validation(labels, is_test, cfg.val) if cfg.val else is_test)
    else:
        check_phases(cfg, seeds, [str(c) for c in range(cfg.synth.n_classes)])
    with ranks.main_first():   # under torchrun the first process fills the caches, the others read them
        mcfg, state, tok = backbone(cfg, cfg.device, con)
        raw = read_data(cfg, mcfg.vit.image_size)
    check_methods(cfg, mcfg, raw, con)
    if ranks.is_main():   # only now: a run refused above leaves no empty folder behind
        os.makedirs(cfg.out, exist_ok=True)
    results, failed = [], []
    for seed in seeds:
        scfg = replace(cfg, seed=seed)
        data = prepare(raw, scfg, mcfg, tok)     # the class order follows the seed
        for method in cfg.method_list:
            name = method if len(seeds) == 1 else f"{method}-seed{seed}"
            res, model = run_method(replace(scfg, out=os.path.join(cfg.out, name)), method, data, mcfg, state, tok, con)
            res["settings"] = {**{k: getattr(scfg, k) for k in RUN_KEYS}, "data": cfg.data}   # what a resume must match, and the data
            res["eval_split"] = "val" if cfg.val else "test"
            results.append(res)
            if not ranks.is_main():
                continue
            folder = os.path.join(cfg.out, name)
            save_model(folder, model, data["class_names"], tok)
            D.write_json(os.path.join(cfg.out, "results.json"), results if len(results) > 1 else results[0])
            if cfg.export and not exported(folder, con):   # a failed export loses no training: go on
                failed.append(name)
    show(results, con)
    if ranks.is_main():
        draw_accuracy(os.path.join(cfg.out, "accuracy.png"), results)
    ranks.barrier()   # the files are written before any process returns
    if failed:
        raise SystemExit(f"error: the ONNX export failed for {', '.join(failed)} (see above); every result is written")
    return results


def exported(folder: str, con) -> bool:
    """export.export_run on a saved method folder; where it fails, its error line and that the trained
    model is kept (the caller writes every result first, and ends the run with an error after)."""
    import export  # lazily: training alone never loads onnx
    try:
        export.export_run(folder, log=con.print)
        return True
    except SystemExit as e:
        con.print(f"{e}\n  the trained model is kept in {folder}; `python export.py {folder}` exports it again")
        return False


class HelpFormat(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the module docstring's layout and shows each option's default (not an empty one,
    None or a switch's False: their help says what leaving them out means)."""

    def _get_help_string(self, action):
        quiet = action.default is None or action.default == "" or action.nargs == 0   # nargs 0: a switch
        return action.help if quiet else super()._get_help_string(action)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormat)
    c = Config()
    p.add_argument("--data", default=c.data, help="manifest CSV/JSONL (fields image,text,label[,split]); default: embedded")
    p.add_argument("--methods", "--method", dest="methods", default=c.methods, help=f"comma-separated: {', '.join(METHODS)}")
    p.add_argument("--phases", type=int, default=None,
                   help=f"phases (default {c.phases}); with --continue, the new classes' phases (default {c.new_phases})")
    p.add_argument("--first-phase", type=int, default=c.first_phase, help="classes in the first phase (0 = even split)")
    p.add_argument("--memory-per-class", type=float, default=c.memory_per_class, help="budget, full exemplars' bytes per class")
    p.add_argument("--memory-bytes", type=int, default=c.memory_bytes, help="fixed total budget in bytes")
    p.add_argument("--seed", type=int, default=c.seed)
    p.add_argument("--seeds", default=c.seeds, help="comma-separated seeds: each method once per seed, mean ± std")
    p.add_argument("--epochs", type=int, default=c.epochs)
    p.add_argument("--batch-size", type=int, default=c.batch_size)
    p.add_argument("--lr", type=float, default=c.lr)
    p.add_argument("--device", default=c.device, choices=["", "cpu", "cuda"], metavar="cpu|cuda",
                   help="where to train ('' = cuda when a GPU is visible, else cpu)")
    p.add_argument("--out", default=c.out, help="output folder (default runs/<manifest name>, or runs/<its folder> for a "
                        "manifest.csv; runs/default for the embedded data)")
    p.add_argument("--resume", action="store_true", help="continue each method from its last finished phase")
    p.add_argument("--adapter", default=c.model.adapter, choices=["ssf", "prompt", "none"])
    p.add_argument("--modalities", default=c.model.modalities, choices=["image,text", "image", "text"],
                   metavar="image,text|image|text", help="the towers the classifier uses")
    p.add_argument("--no-export", action="store_true", help="do not write model.onnx at the end")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the towers (models.compile_towers: dynamic shapes, models.COMPILE_OPTIONS), on "
                        "the CPU or CUDA (see the README's speed results)")
    p.add_argument("--vit", default=c.vit, help="timm ViT name whose pretrained weights replace the default image tower")
    p.add_argument("--vit-file", default=c.vit_file, help="local weights file for --vit")
    p.add_argument("--text-model", default=c.text_model, help="BERT-family folder (config.json, model.safetensors, vocab.txt)")
    p.add_argument("--clip", default=c.clip, help="CLIP or SigLIP checkpoint (Hugging Face folder, or OpenAI / open_clip "
                                                  "state dict) whose two towers replace both default towers")
    p.add_argument("--keep-image", type=float, default=c.keep_image, help="share of patches a masked exemplar keeps (see --fill for a class with too few rows to fill its bytes)")
    p.add_argument("--lowres", type=int, default=c.lowres,
                   help="a masked exemplar also stores its whole image at 1/LOWRES of its side, replayed whole with "
                        "its kept patches sharp (after CIM; 0 = off)")
    p.add_argument("--keep-text", type=float, default=c.keep_text,
                   help="share of caption tokens a masked exemplar keeps (1 = whole; the paper's text mask: e.g. 0.8)")
    p.add_argument("--image-mask", default=c.image_mask, choices=IMAGE_MASKS,
                   help="how exmask picks the patches it keeps (paper-mask is the paper's plain rule)")
    p.add_argument("--herding", default=c.herding, choices=["full", "masked"],
                   help="masked methods choose exemplars by herding the full samples' features, or their masked "
                        "exemplars' toward the full class mean")
    p.add_argument("--fill", default=c.fill, choices=["patches", "copies"],
                   help="masked methods, a class whose rows all fit with bytes to spare: more patches per exemplar, "
                        "or more masked copies of each row at --keep-image, each keeping other patches")
    p.add_argument("--mask-candidates", type=int, default=c.mask_candidates,
                   help="random masks the feature and class rules choose the best of")
    p.add_argument("--val", type=float, default=c.val,
                   help="carve this share of the training rows as validation and report on it (choosing settings)")
    p.add_argument("--smooth-image", type=int, default=c.smooth_image,
                   help="average patch attention over k x k neighbours before keeping the top (1 = raw)")
    p.add_argument("--recombine", type=float, default=c.recombine, help="share of replayed exemplars recombined (same-class text swap)")
    p.add_argument("--token-mixup", type=float, default=c.token_mixup, help="share of replayed exemplars token-mixed")
    p.add_argument("--replay", default=c.replay, choices=["epoch", "batch"],
                   help="epoch: every exemplar once per epoch beside the new data; batch: batch-size exemplars per step")
    p.add_argument("--replay-passes", type=int, default=c.replay_passes,
                   help="epoch replay: every exemplar this many times per epoch (the passes shuffled together)")
    p.add_argument("--balanced-head", type=int, default=c.balanced_head,
                   help="after each phase, this many epochs of training the head alone on the memory (0 = off)")
    p.add_argument("--mask-new", type=float, default=c.mask_new, help="share of new samples also trained masked")
    p.add_argument("--consistency", type=float, default=c.consistency,
                   help="weight pulling a new sample's masked view's prediction toward its whole view's (0 = off)")
    p.add_argument("--mask-new-rule", choices=("method", "random"), default=c.mask_new_rule,
                   help="how those masked views are masked: as the method masks its exemplars, or at random")
    p.add_argument("--adjust-views", type=int, choices=(0, 1), default=int(c.adjust_views),
                   help="masked methods: logit adjustment with one prior for whole views and one for masked views "
                        "(1), or one prior for all rows (0)")
    p.add_argument("--logit-adjust", type=float, default=c.logit_adjust,
                   help="train with each logit shifted by this times the log of its class's share of the phase's "
                        "rows (logit adjustment against the new classes' many rows; 0 = off)")
    p.add_argument("--continue", dest="continue_from", metavar="RUN_DIR", default=c.continue_from,
                   help="learn --data's new classes after this finished run (its settings and memory); see extend.py")
    p.add_argument("--dist-timeout", type=float, default=c.dist_timeout,
                   help="under torchrun: seconds a process waits for the others in a collective before the job ends")
    p.add_argument("--eval-data", default=c.eval_data, help="with --continue: the run's manifest, to measure its old classes too")
    a = p.parse_args(argv)
    new_phases = a.phases if a.continue_from and a.phases is not None else c.new_phases
    phases = a.phases if not a.continue_from and a.phases is not None else c.phases
    try:
        cfg = Config(data=a.data, methods=a.methods, phases=phases, first_phase=a.first_phase,
                     continue_from=a.continue_from, new_phases=new_phases, eval_data=a.eval_data,
                     memory_per_class=a.memory_per_class, memory_bytes=a.memory_bytes, seed=a.seed, seeds=a.seeds, epochs=a.epochs,
                     batch_size=a.batch_size, lr=a.lr, device=a.device, out=a.out, resume=a.resume,
                     export=not a.no_export, compile=a.compile, model=replace(c.model, adapter=a.adapter, modalities=a.modalities),
                     vit=a.vit, vit_file=a.vit_file, text_model=a.text_model, clip=a.clip, keep_image=a.keep_image, lowres=a.lowres, keep_text=a.keep_text,
                     smooth_image=a.smooth_image, image_mask=a.image_mask, herding=a.herding, fill=a.fill, mask_candidates=a.mask_candidates, val=a.val,
                     recombine=a.recombine, token_mixup=a.token_mixup, mask_new=a.mask_new, mask_new_rule=a.mask_new_rule, consistency=a.consistency, logit_adjust=a.logit_adjust, adjust_views=bool(a.adjust_views), replay=a.replay, replay_passes=a.replay_passes, balanced_head=a.balanced_head,
                     dist_timeout=a.dist_timeout)
    except ValueError as e:   # a bad value: one line, exit 2 as argparse's own errors
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        train(cfg)
        ranks.teardown()
    except SystemExit as e:   # a problem the user can fix: its one line, and exit 2 as a usage error does
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            raise SystemExit(2) from None
        raise
    except torch.cuda.OutOfMemoryError:
        print(f"error: the GPU ran out of memory; try --batch-size {max(1, cfg.batch_size // 2)} (now "
              f"{cfg.batch_size}), and --resume to go on from the last finished phase", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: no space left on the disk while writing {e.filename or cfg.out or 'runs/'}; the last good "
              "files are kept: free some space, then run again with --resume", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
