"""The frozen towers: the default tiny ones, pretrained once on a disjoint synthetic corpus and
cached, or real pretrained weights in their place: a timm ViT and/or a BERT-family text tower, or
both towers of one CLIP or SigLIP model.

`cfg` below is a train.Config (the fields model, pretrain, cache_dir, vit, vit_file, text_model, clip).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

import data as D
import exmask
import models as M


@dataclass
class PretrainConfig:
    """Contrastive + classification pretraining of the default tiny towers on a synthetic corpus
    whose classes, names and sprites are disjoint from the incremental ones."""
    classes: int = 200
    per_class: int = 40
    class_offset: int = 100      # pretraining classes come from another part of the class pool
    seed: int = 1                # another world: other sprites, other class -> background links
    bg_prob: float = 0.1         # backgrounds barely tied to classes, so the towers learn to look at objects
    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    vocab_size: int = 700
    patch_drop: float = 0.5      # share of patches dropped at random in each pretraining step



# ----------------------------------------------------------------------------- helpers

def console(cfg):
    """The run's console (cfg: a train.Config; quiet as cfg.quiet says)."""
    from rich.console import Console
    # a log file or notebook gets a wide table instead of rich's 80-column default
    return Console(quiet=cfg.quiet, highlight=False, markup=False, width=None if sys.stdout.isatty() else 150)


def progress(con):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=con, transient=True, disable=con.quiet)


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of paired embeddings a, b (B, E)."""
    logits = M.similarity(a, b, logit_scale)                                          # (B, B)
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def pretrain(mcfg: M.ModelConfig, pcfg: PretrainConfig, device: str, con) -> tuple[dict, D.SPTokenizer]:
    """Train the default towers from scratch on the disjoint pretraining corpus."""
    corpus = D.make_synth(D.SynthConfig(n_classes=pcfg.classes, train_per_class=pcfg.per_class, test_per_class=0,
                                        class_offset=pcfg.class_offset, seed=pcfg.seed,
                                        bg_prob=pcfg.bg_prob))
    tok = D.SPTokenizer.train(corpus["texts"], pcfg.vocab_size)
    mcfg = replace(mcfg, adapter="none", modalities="image,text", text=replace(mcfg.text, vocab_size=tok.vocab_size))
    torch.manual_seed(pcfg.seed)
    model = M.TwoTower(mcfg).to(device)
    heads = torch.nn.ModuleList([torch.nn.Linear(mcfg.vit.embed_dim, pcfg.classes),
                                 torch.nn.Linear(mcfg.text.embed_dim, pcfg.classes)]).to(device)
    scale = torch.nn.Parameter(torch.tensor(math.log(10.0), device=device))
    params = list(model.image.parameters()) + list(model.text.parameters()) + list(heads.parameters()) + [scale]
    opt = torch.optim.AdamW(params, lr=pcfg.lr, weight_decay=0.05)
    patches = M.patchify(corpus["images"], mcfg.vit.patch_size)
    ids = D.encode_texts(tok, corpus["texts"], mcfg.text.context)
    labels = corpus["labels"]
    n, B = len(labels), pcfg.batch_size
    steps = pcfg.epochs * (n // B)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, pcfg.lr, total_steps=steps, pct_start=0.1)
    with progress(con) as bar:
        task = bar.add_task("pretraining the default towers (once, then cached)", total=steps)
        for _ in range(pcfg.epochs):
            for b in torch.randperm(n).split(B)[: n // B]:
                x, t, y = patches[b].to(device), ids[b].to(device), labels[b].to(device)
                pidx = M.all_patches(x)
                if pcfg.patch_drop > 0:   # PatchDropout/FLIP-style: the towers learn to work from a subset of patches
                    keep = exmask.keep_count(pidx.shape[1], 1 - pcfg.patch_drop)
                    pidx = torch.rand(pidx.shape, device=device).argsort(1)[:, :keep]
                    x = M.gather_tokens(x, pidx)
                ei, et = model.image(x, pidx), model.text(t)
                loss = (clip_loss(ei, et, scale) + F.cross_entropy(heads[0](ei), y)
                        + F.cross_entropy(heads[1](et), y))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.advance(task)
    con.print(f"pretraining done, last loss {loss.item():.3f}")
    return model.backbone_state(), tok


# config fields added after caches were first written (for CLIP and SigLIP towers): left out of the
# cache key while they hold their defaults, so that towers cached before them stay valid
LATER_FIELDS = {"ViTConfig": {"norm_pre", "act"}, "TextConfig": {"act", "causal", "pool", "fill_id", "proj_bias"}}


def key_fields(cfg, skip: tuple = ()) -> dict:
    """A tower config's fields for the cache key: all but `skip`, and LATER_FIELDS at their defaults."""
    later, default = LATER_FIELDS[type(cfg).__name__], type(cfg)()
    return {k: v for k, v in asdict(cfg).items() if k not in skip and not (k in later and v == getattr(default, k))}


def default_backbone(cfg, device: str, con) -> tuple[M.ModelConfig, dict, object]:
    """The default towers: pretrained once per (model config, pretraining config), then cached."""
    cache = D.cache_root(cfg.cache_dir)
    key = fingerprint({"vit": key_fields(cfg.model.vit), "text": key_fields(cfg.model.text, skip=("vocab_size",)),
                       "pretrain": asdict(cfg.pretrain), "synth": "v5"})
    path = os.path.join(cache, f"backbone-{key}.pt")
    ck = None
    if os.path.exists(path):
        try:
            ck = torch.load(path, weights_only=True)
            tok = D.SPTokenizer(ck["tokenizer"].numpy().tobytes())
            con.print(f"backbone: cached {path}")
        except Exception as e:   # truncated, corrupt, or carrying a pickle payload: never run it, pretrain again
            con.print(f"backbone: the cached towers {path} are unreadable ({type(e).__name__}); pretraining again")
            ck = None
    if ck is None:
        t0 = time.time()
        state, tok = pretrain(cfg.model, cfg.pretrain, device, con)
        os.makedirs(cache, exist_ok=True)
        D.write_atomic(path, lambda tmp: torch.save({"state": {k: v.cpu() for k, v in state.items()},
                                                     "tokenizer": torch.frombuffer(bytearray(tok.proto), dtype=torch.uint8)},
                                                    tmp))   # never a half-written cache file
        con.print(f"backbone: pretrained in {time.time() - t0:.0f}s, cached at {path}")
        ck = {"state": state}
    mcfg = replace(cfg.model, text=replace(cfg.model.text, vocab_size=tok.vocab_size))
    return mcfg, ck["state"], tok


def timm_tower(name: str, file: str = "") -> tuple[M.ViTConfig, dict]:
    """A pretrained timm ViT -> (ViTConfig, our image-tower state). Weights from `file` when given."""
    import timm
    if file and not os.path.exists(file):
        raise SystemExit(f"error: cannot load timm model {name!r}: no weights file {file}")
    kw = {"pretrained_cfg_overlay": {"file": file}} if file else {}
    try:
        ref = timm.create_model(name, pretrained=True, num_classes=0, **kw)
    except Exception as e:  # no network, unknown name, bad file: say which
        raise SystemExit(f"error: cannot load timm model {name!r}: {(str(e) or type(e).__name__).splitlines()[0]}") from None
    try:   # a timm ViT this tower cannot hold (another pool, activation or block layout): say which
        vcfg = M.vit_config_from_timm(ref)
        tower = M.ViT(vcfg)
        M.load_timm_vit(tower, ref.state_dict())
    except (ValueError, AttributeError) as e:
        raise SystemExit(f"error: cannot use timm model {name!r}: {(str(e) or type(e).__name__).splitlines()[0][:300]}") from None
    return vcfg, tower.state_dict()


def bert_tower(path: str, context: int) -> tuple[M.TextConfig, dict, D.WordPieceTokenizer]:
    """A BERT-family checkpoint folder -> (TextConfig, our text-tower state, WordPiece tokenizer)."""
    for f in ("config.json", "model.safetensors", "vocab.txt"):
        if not os.path.exists(os.path.join(path, f)):
            raise SystemExit(f"error: {path} has no {f} (a BERT-family checkpoint folder is expected)")
    try:   # another architecture's names (e.g. RoBERTa's), a tensor type safetensors reading lacks: say which
        tcfg, state = M.load_bert(path)
    except (KeyError, ValueError, OSError, RuntimeError) as e:
        raise SystemExit(f"error: cannot load --text-model {path} as a BERT-family checkpoint: "
                         f"{type(e).__name__}: {(str(e) or '-').splitlines()[0][:300]}") from None
    context = min(context, tcfg.context)          # captions are short: keep the first positions only
    state["pos_embed"] = state["pos_embed"][:, :context]
    return replace(tcfg, context=context), state, D.WordPieceTokenizer(os.path.join(path, "vocab.txt"))


CLIP_OPENAI_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
CLIP_BPE_FILES = ("vocab.json", "bpe_simple_vocab_16e6.txt.gz")


def clip_tower(path: str) -> tuple[M.ViTConfig, M.TextConfig, dict, object]:
    """Both towers of a CLIP or SigLIP checkpoint -> (ViTConfig, TextConfig, state in TwoTower's
    names, the model's own tokenizer). `path` is a Hugging Face folder (config.json and
    model.safetensors of a CLIPModel or SiglipModel, with vocab.json + merges.txt or spiece.model),
    or a CLIP state dict in OpenAI's / open_clip's layout: a .pt, .bin or .safetensors file, or an
    open_clip folder holding one (open_clip_pytorch_model.bin, open_clip_model.safetensors), with the
    BPE files beside it (vocab.json + merges.txt, or OpenAI's bpe_simple_vocab_16e6.txt.gz) and
    open_clip's open_clip_config.json where there is one (it says the activation and the heads)."""
    if not os.path.exists(path):
        raise SystemExit(f"error: --clip {path}: no such file or folder")
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
            vcfg, tcfg, state, _ = M.load_clip_hf(path)
        else:
            file = path if os.path.isfile(path) else next(
                (os.path.join(path, n) for n in CLIP_OPENAI_FILES if os.path.exists(os.path.join(path, n))), None)
            if file is None:
                raise SystemExit(f"error: --clip {path}: neither a Hugging Face folder (config.json) nor an "
                                 f"open_clip one ({' or '.join(CLIP_OPENAI_FILES)})")
            oc = os.path.join(folder, "open_clip_config.json")
            kw = {}
            if os.path.exists(oc):
                with open(oc) as f:
                    c = json.load(f)
                kw = {"model_cfg": c.get("model_cfg", {})}
                pre = c.get("preprocess_cfg", {})
                kw |= {k: tuple(pre[k]) for k in ("mean", "std") if k in pre}
            vcfg, tcfg, state, _ = M.load_clip_openai(file, **kw)
    except (ValueError, OSError, RuntimeError, KeyError) as e:   # a foreign or damaged checkpoint: say which, in one line
        raise SystemExit(f"error: cannot load --clip {path}: {(str(e) or type(e).__name__).splitlines()[0][:300]}") from None
    if tcfg.pool == "last":   # SigLIP
        if not os.path.exists(os.path.join(folder, "spiece.model")):
            raise SystemExit(f"error: --clip {path}: no spiece.model (SigLIP's tokenizer) in {folder}")
        tok = D.SiglipTokenizer.load(os.path.join(folder, "spiece.model"))
    elif os.path.exists(os.path.join(folder, "vocab.json")) and os.path.exists(os.path.join(folder, "merges.txt")):
        tok = D.ClipTokenizer.load(folder)
    elif os.path.exists(os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz")):
        tok = D.ClipTokenizer.load(os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz"))
    else:
        raise SystemExit(f"error: --clip {path}: no tokenizer in {folder} (vocab.json + merges.txt, or "
                         "bpe_simple_vocab_16e6.txt.gz)")
    if tok.pad_id != tcfg.pad_id:
        raise SystemExit(f"error: --clip {path}: the tokenizer has {tok.pad_id} tokens, the text tower "
                         f"{tcfg.pad_id}")
    return vcfg, tcfg, state, tok


def backbone(cfg, device: str, con) -> tuple[M.ModelConfig, dict, object]:
    """The frozen towers: the default pretrained tiny ones, with either tower replaced by real
    pretrained weights when --vit / --text-model are given, or both by --clip. The default pair and
    a CLIP / SigLIP pair were each trained into one embedding space (mcfg.shared_space True); with
    one tower replaced the pair shares none (False), so the text mask's cross-modal context term is
    skipped, whatever the towers' widths."""
    if cfg.clip:
        if cfg.vit or cfg.text_model:
            raise SystemExit("error: --clip sets both towers; give it without --vit and --text-model")
        vcfg, tcfg, state, tok = clip_tower(cfg.clip)
        kind = "SigLIP" if tcfg.pool == "last" else "CLIP"
        con.print(f"towers: {kind} {cfg.clip} (image {vcfg.depth} blocks, dim {vcfg.dim}, {vcfg.image_size}px; "
                  f"text {tcfg.depth} blocks, dim {tcfg.dim}; one embedding space)")
        return replace(cfg.model, vit=vcfg, text=tcfg, shared_space=True), state, tok
    if cfg.vit and cfg.text_model:
        mcfg, state, tok = cfg.model, {}, None
    else:
        mcfg, state, tok = default_backbone(cfg, device, con)
    if cfg.vit or cfg.text_model:
        mcfg = replace(mcfg, shared_space=False)
    if cfg.vit:
        vcfg, vstate = timm_tower(cfg.vit, cfg.vit_file)
        mcfg = replace(mcfg, vit=vcfg)
        state = {k: v for k, v in state.items() if not k.startswith("image.")} | {f"image.{k}": v for k, v in vstate.items()}
        con.print(f"image tower: timm {cfg.vit} ({vcfg.depth} blocks, dim {vcfg.dim}, {vcfg.image_size}px)")
    if cfg.text_model:
        tcfg, tstate, tok = bert_tower(cfg.text_model, 64)
        mcfg = replace(mcfg, text=tcfg)
        state = {k: v for k, v in state.items() if not k.startswith("text.")} | {f"text.{k}": v for k, v in tstate.items()}
        con.print(f"text tower: {cfg.text_model} ({tcfg.depth} blocks, dim {tcfg.dim})")
    return mcfg, state, tok
