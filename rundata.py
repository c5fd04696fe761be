"""A run's data and what is checked before it trains: the rows read (read_data: a manifest through
the image cache, or the embedded data; the validation split), the patch view cut per batch
(Patches), token ids and labels in the seed's class order (prepare); the default run folder's name
(data_name), and the checks that make every problem one `error:` line before any long work
(check_phases, check_methods). `cfg` is a train.Config; train.py re-exports every name.
"""
from __future__ import annotations

import os

import torch

import data as D
import models as M
import ranks
from towers import console, progress


# ----------------------------------------------------------------------------- the data

def read_data(cfg, image_size: int) -> dict:
    """The run's rows: a manifest (its images decoded once into the on-disk cache, memory-mapped) or
    the embedded data at image_size px, with is_train and is_test (is_test: the validation rows
    carved from the training rows where cfg.val > 0)."""
    if cfg.data:   # the split never depends on the run's seed; images are memory-mapped from the cache
        con, bar = console(cfg), []

        def step(done: int, total: int) -> None:   # a bar only while a first read decodes the images
            if not bar:
                bar.append(progress(con))
                bar[0].start()
                bar[0].add_task("decoding images into the cache (once)", total=total)
            bar[0].update(bar[0].task_ids[0], completed=done)
        try:
            raw = D.read_manifest(cfg.data, image_size, cache_dir=cfg.cache_dir, log=con.print, progress=step)
        finally:
            for b in bar:
                b.stop()
    elif image_size != cfg.synth.image_size:
        raise SystemExit(f"error: the embedded data is {cfg.synth.image_size}px; a {image_size}px tower needs --data")
    else:
        raw = D.make_synth(cfg.synth)
    raw["is_train"] = ~raw["is_test"]
    if cfg.val > 0:   # choose settings here: the test rows are never looked at
        val = D.carve_validation(raw["labels"], raw["is_test"], cfg.val)
        raw["is_train"], raw["is_test"] = raw["is_train"] & ~val, val
    return raw


class Patches:
    """The dataset's patches, cut from its images when rows are asked for: view[idx] -> (n, n_patches,
    3*p*p) uint8 for a LongTensor or list of rows (an int: one row). Holds nothing but the images,
    which may be a memory-mapped cache larger than RAM."""

    def __init__(self, images: torch.Tensor, p: int):
        self.images, self.p = images, p                                      # (N, 3, S, S) uint8
        N, C, S, _ = images.shape
        self.shape = torch.Size((N, (S // p) ** 2, C * p * p))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, int) or (torch.is_tensor(idx) and idx.dim() == 0):
            return M.patchify(self.images[int(idx)][None], self.p)[0]        # (n_patches, 3*p*p)
        idx = torch.as_tensor(idx)
        idx = idx.nonzero().flatten() if idx.dtype == torch.bool else idx.long()
        rows, order = idx.sort()                 # a memory map reads sorted rows much faster than random ones
        # numpy's gather copies whole rows: ~10x faster than torch's indexing of a (N, 3, S, S) uint8 map
        x = self.images.numpy()[rows.numpy()]                               # (n, 3, S, S)
        if not torch.equal(rows, idx):
            x = x[order.argsort().numpy()]                                  # back in the order asked for
        return M.patchify(torch.from_numpy(x), self.p)


def prepare(raw: dict, cfg, mcfg: M.ModelConfig, tok) -> dict:
    """Patches (a view: cut per batch), token ids and labels (in class-order index space) of the
    whole dataset. The images are shared with `raw`, never copied."""
    C = len(raw["class_names"])
    order = D.class_order(C, cfg.seed)
    remap = torch.empty(C, dtype=torch.long)
    remap[torch.tensor(order)] = torch.arange(C)
    p = mcfg.vit.patch_size
    out = {"patches": Patches(raw["images"], p),                             # (N, n_patches, 3*p*p) uint8
           "ids": D.encode_texts(tok, raw["texts"], mcfg.text.context),     # (N, context)
           "labels": remap[raw["labels"]], "is_test": raw["is_test"], "is_train": raw["is_train"],
           "texts": raw["texts"], "class_names": [raw["class_names"][c] for c in order]}  # index i = label i
    if "objects" in raw:   # each patch's object share (N, n_patches), for the oracle masks (in chunks:
        # a float copy of every mask at once would be 4x the masks' bytes)
        out["objects"] = torch.cat([M.patchify(o[:, None], p).float().mean(-1) / 255 for o in raw["objects"].split(4096)])
    return out


# ----------------------------------------------------------------------------- checks before a run

def data_name(path: str) -> str:
    """The default run folder's name for a manifest: its file name, or its folder's where the file has
    the name every data.py recipe writes (manifest.csv), so that two data sets never share runs/manifest."""
    if not path:
        return "default"
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.basename(os.path.dirname(os.path.abspath(path))) or stem if stem == "manifest" else stem


def check_phases(cfg, seeds: list[int], names: list[str], labels: torch.Tensor | None = None,
                 is_eval: torch.Tensor | None = None) -> None:
    """The phase split must work for every seed: no empty phase, and (where the rows are known) rows
    to evaluate each phase on. One error line otherwise."""
    try:
        for seed in seeds:
            for j, cls in enumerate(D.phase_classes(D.class_order(len(names), seed), cfg.phases, cfg.first_phase)):
                if labels is not None and not (is_eval & torch.isin(labels, torch.tensor(cls))).any():
                    raise ValueError(f"with --seed {seed}, phase {j + 1} (classes {[names[c] for c in cls][:5]}) has no "
                                     f"{'validation' if cfg.val else 'test'} rows to measure it on; give those classes "
                                     "more rows, or choose other --phases")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


# ablations that change nothing where the caption is kept whole (--keep-text 1, the default)
SAME_AT_WHOLE_TEXT = {"image-mask": "exmask itself", "no-context": "exmask itself",
                      "text-mask": "replay's exemplars (every patch and word kept)"}


def check_processes(cfg) -> None:
    """What must run in one process (under torchrun, ranks.py): --consistency pairs each masked view
    with its whole view's logits, which a process's shard of the step does not hold."""
    if cfg.consistency > 0 and ranks.world_size() > 1:
        raise SystemExit("error: --consistency runs in one process; leave it out under torchrun")


def check_methods(cfg, mcfg: M.ModelConfig, raw: dict, con, notes: bool = True) -> None:
    """What the methods and options need of the towers and the data, checked before the first phase
    (one error line), and (notes) a note for each ablation that the settings leave equal to another method."""
    S = mcfg.vit.image_size
    if cfg.lowres and S % cfg.lowres:
        raise SystemExit(f"error: --lowres {cfg.lowres} must divide the image side ({S} px)")
    if "oracle-mask" in cfg.method_list and "objects" not in raw:
        raise SystemExit("error: oracle-mask needs object masks: a manifest `mask` column (data.py icons writes one)")
    for m in cfg.method_list if notes else ():
        if m in SAME_AT_WHOLE_TEXT and cfg.keep_text >= 1:
            con.print(f"note: with --keep-text 1 (captions kept whole) {m} stores {SAME_AT_WHOLE_TEXT[m]}; "
                      "give --keep-text below 1 for it to ablate the text mask")
