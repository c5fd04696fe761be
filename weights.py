"""Real pretrained weights into models.py's towers: timm ViTs, BERT-family text towers (safetensors),
and both towers of CLIP (Hugging Face or OpenAI / open_clip layout) and SigLIP checkpoints.
models.py re-exports every name here, so `models.load_bert` and the like keep working."""
from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from models import TextConfig, ViT, ViTConfig

# ----------------------------------------------------------------------------- real weights

def load_timm_vit(vit: ViT, state: dict) -> None:
    """Copy a timm VisionTransformer state dict into `vit` (our names are timm's). Classifier-head
    keys are ignored; anything else missing or extra is an error."""
    ours = vit.state_dict()
    src = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.", "head_drop"))
           and not k.startswith("attn_pool.fc_norm")}
    missing = [k for k in ours if k not in src and "_ssf." not in k and ".prompt" not in k and k != "proj.weight"]
    extra = [k for k in src if k not in ours]
    if missing or extra:
        raise ValueError(f"timm checkpoint does not match the ViT config: missing {missing[:5]}, extra {extra[:5]}")
    vit.load_state_dict(src, strict=False)


def timm_activation(act) -> str:
    """Our name (models.ACTIVATIONS) for a timm ViT's MLP activation module; ValueError for another."""
    kind, approx = type(act).__name__, getattr(act, "approximate", "none")
    names = {("GELU", "none"): "gelu", ("GELU", "tanh"): "gelu_tanh", ("GELUTanh", "none"): "gelu_tanh",
             ("QuickGELU", "none"): "quick_gelu"}
    if (kind, approx) not in names:
        raise ValueError(f"the MLP activation {kind} is not supported (GELU, its tanh form, quick-GELU are)")
    return names[kind, approx]


def vit_config_from_timm(model) -> ViTConfig:
    """A ViTConfig describing a timm VisionTransformer instance (no projection: embed_dim=0): pooled at
    its class token or by its attention pool, as timm's global_pool "token" and "map"; another pool
    (e.g. "avg", with its fc_norm) is a ValueError, as is an activation models.ACTIVATIONS lacks."""
    from models import ViTConfig   # here, not at the top: models.py imports this module
    pc = getattr(model, "pretrained_cfg", {}) or {}
    pool = getattr(model, "global_pool", "token")
    if pool not in ("token", "map") or not isinstance(getattr(model, "fc_norm", None), (nn.Identity, type(None))):
        raise ValueError(f"global_pool {pool!r}: only a class token ('token') or an attention pool ('map') is supported")
    return ViTConfig(image_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
                     dim=model.embed_dim, depth=len(model.blocks), heads=model.blocks[0].attn.num_heads,
                     mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.embed_dim,
                     pool="map" if pool == "map" else "cls", act=timm_activation(model.blocks[0].mlp.act),
                     embed_dim=0, ln_eps=model.norm.eps,
                     mean=tuple(pc.get("mean", (0.5,) * 3)), std=tuple(pc.get("std", (0.5,) * 3)))


def read_safetensors(path: str) -> dict:
    """Read a .safetensors file with the standard library and torch (no extra package)."""
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = memoryview(bytearray(f.read()))   # tensors are views of it: one copy of the file in memory
    out = {}
    for k, meta in header.items():
        if k == "__metadata__":
            continue
        if meta["dtype"] not in dtypes:
            raise ValueError(f"{path}: tensor {k} has dtype {meta['dtype']}, which this reader does not know")
        a, b = meta["data_offsets"]
        t = torch.frombuffer(data[a:b], dtype=dtypes[meta["dtype"]]) if b > a else torch.empty(0)
        out[k] = t.reshape(meta["shape"]).float()
    return out


def bert_to_ours(sd: dict, depth: int) -> dict:
    """HF BERT names -> our TextTransformer names (q, k, v joined into qkv)."""
    sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    out = {"tok_embed.weight": sd["embeddings.word_embeddings.weight"],
           "pos_embed": sd["embeddings.position_embeddings.weight"][None],
           "type_embed": sd["embeddings.token_type_embeddings.weight"][:1][None],
           "emb_norm.weight": sd["embeddings.LayerNorm.weight"], "emb_norm.bias": sd["embeddings.LayerNorm.bias"]}
    for i in range(depth):
        p, q = f"encoder.layer.{i}.", f"blocks.{i}."
        for s in ("weight", "bias"):
            out[q + "attn.qkv." + s] = torch.cat([sd[p + f"attention.self.{n}.{s}"] for n in ("query", "key", "value")])
            out[q + "attn.proj." + s] = sd[p + "attention.output.dense." + s]
            out[q + "norm1." + s] = sd[p + "attention.output.LayerNorm." + s]
            out[q + "mlp.fc1." + s] = sd[p + "intermediate.dense." + s]
            out[q + "mlp.fc2." + s] = sd[p + "output.dense." + s]
            out[q + "norm2." + s] = sd[p + "output.LayerNorm." + s]
    return out


def load_bert(path: str) -> tuple[TextConfig, dict]:
    """A BERT-family checkpoint directory (config.json + model.safetensors, e.g. all-MiniLM-L6-v2)
    -> (TextConfig, state dict in our names). Its vocab.txt goes to data.WordPieceTokenizer. Pooled
    at [CLS], or as a sentence-transformers folder's 1_Pooling/config.json says: the mean of the
    tokens where it asks for that (all-MiniLM-L6-v2 does: its sentence embedding)."""
    from models import TextConfig   # here, not at the top: models.py imports this module
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    pool = "cls"
    pooling = os.path.join(path, "1_Pooling", "config.json")
    if os.path.exists(pooling):
        with open(pooling) as f:
            p = json.load(f)
        modes = [k for k, v in p.items() if k.startswith("pooling_mode_") and v]
        if modes not in (["pooling_mode_mean_tokens"], ["pooling_mode_cls_token"]):
            raise ValueError(f"{pooling}: pooling {modes} (only the mean of the tokens or [CLS] is supported)")
        pool = "mean" if modes == ["pooling_mode_mean_tokens"] else "cls"
    cfg = TextConfig(vocab_size=c["vocab_size"], context=c["max_position_embeddings"], dim=c["hidden_size"],
                     depth=c["num_hidden_layers"], heads=c["num_attention_heads"],
                     mlp_ratio=c["intermediate_size"] / c["hidden_size"], pre_norm=False, embed_dim=0,
                     pad_id=c.get("pad_token_id", 0), ln_eps=c.get("layer_norm_eps", 1e-12), pool=pool)
    return cfg, bert_to_ours(read_safetensors(os.path.join(path, "model.safetensors")), cfg.depth)


# ----------------------------------------------------------------------------- CLIP and SigLIP

# Both towers of one contrastively trained model, so they share an embedding space. What each needs:
#   CLIP   image: [CLS] pooling, a LayerNorm before the blocks (ln_pre), a projection; text: causal,
#          pooled at the end-of-text token, a projection; quick-GELU in OpenAI's weights.
#   SigLIP image: no [CLS], the attention-pool probe (MAP head), no projection; text: bidirectional,
#          every caption read at the full context (</s> fills it) and pooled at the last position,
#          a linear head with a bias; tanh-approximated GELU.
# The text tower's pad token is one past the checkpoint's vocabulary (an embedding row of zeros,
# always masked): CLIP's and SigLIP's own pad ids are real tokens (SigLIP pads with </s>).
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HF_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
# the Hugging Face config fields that the weights' shapes do not give, with the classes' defaults
# (config.json may leave a default out)
HF_DEFAULTS = {
    "clip": {"text": {"num_attention_heads": 8, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
             "vision": {"num_attention_heads": 12, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}},
    "siglip": {"text": {"num_attention_heads": 12, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                        "pad_token_id": 1},
               "vision": {"num_attention_heads": 12, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}},
}


def similarity(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor | float,
               logit_bias: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Image-text logits (B_img, B_txt): exp(logit_scale) * cosine + logit_bias (CLIP's, and with a
    bias SigLIP's; the default towers' pretraining loss uses it too)."""
    scale = torch.as_tensor(logit_scale, dtype=img_emb.dtype, device=img_emb.device).exp()
    return scale * F.normalize(img_emb, dim=-1) @ F.normalize(txt_emb, dim=-1).T + logit_bias


def read_weights(path: str) -> dict:
    """A state dict, fp32, from a .safetensors file or a PyTorch file (tensors only: weights_only)."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)                      # open_clip's training checkpoints wrap it
    return {k.removeprefix("module."): v.float() for k, v in sd.items() if isinstance(v, torch.Tensor)}


def count_blocks(sd: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def hf_blocks(sd: dict, prefix: str, depth: int) -> dict:
    """Hugging Face CLIP/SigLIP encoder layers (popped from sd) -> our blocks (q, k, v joined into qkv)."""
    out = {}
    for i in range(depth):
        p, q = f"{prefix}{i}.", f"blocks.{i}."
        for s in ("weight", "bias"):
            out[q + "attn.qkv." + s] = torch.cat([sd.pop(p + f"self_attn.{n}_proj.{s}") for n in "qkv"])
            for ours, theirs in (("attn.proj", "self_attn.out_proj"), ("norm1", "layer_norm1"),
                                 ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[f"{q}{ours}.{s}"] = sd.pop(f"{p}{theirs}.{s}")
    return out


def openai_blocks(sd: dict, prefix: str, depth: int) -> dict:
    """OpenAI / open_clip residual blocks (popped from sd) -> our blocks (in_proj is already qkv)."""
    out = {}
    for i in range(depth):
        p, q = f"{prefix}{i}.", f"blocks.{i}."
        for s in ("weight", "bias"):
            for ours, theirs in (("attn.qkv", "attn.in_proj"), ("attn.proj", "attn.out_proj"), ("norm1", "ln_1"),
                                 ("norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                key = f"{p}{theirs}_{s}" if theirs == "attn.in_proj" else f"{p}{theirs}.{s}"
                out[f"{q}{ours}.{s}"] = sd.pop(key)
    return out


def pairs(sd: dict, ours: str, theirs: str) -> dict:
    """A LayerNorm or Linear's weight and bias, popped from sd under `theirs`, named `ours`."""
    return {f"{ours}.{s}": sd.pop(f"{theirs}.{s}") for s in ("weight", "bias")}


def pad_row(tok_embed: torch.Tensor) -> torch.Tensor:
    """The token embedding (V, D) with a row of zeros for our pad token (id V) appended."""
    return torch.cat([tok_embed, tok_embed.new_zeros(1, tok_embed.shape[1])])


def no_leftovers(sd: dict, what: str) -> None:
    """Every weight of the checkpoint was used (position-id buffers aside): a variant we do not
    know is an error, not a tower loaded in part."""
    left = [k for k in sd if not k.endswith(("position_ids", "attn_mask"))]
    if left:
        raise ValueError(f"{what} has weights this loader does not know: {left[:5]}")


def hf_weights(path: str) -> dict:
    """The weights of a Hugging Face folder: model.safetensors, its shards, or pytorch_model.bin."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(path, name)):
            return read_weights(os.path.join(path, name))
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return {k: v for name in files for k, v in read_weights(os.path.join(path, name)).items()}
    raise FileNotFoundError(f"no model.safetensors (or pytorch_model.bin) in {path}")


def load_clip_hf(path: str) -> tuple[ViTConfig, TextConfig, dict, dict]:
    """A Hugging Face CLIPModel or SiglipModel folder (config.json + model.safetensors) -> (ViTConfig,
    TextConfig, state dict in TwoTower's names, {"logit_scale", "logit_bias"}). Sizes come from the
    weights' shapes; heads, activation and LayerNorm eps from config.json; pixel mean and std from
    preprocessor_config.json where there is one."""
    from models import TextConfig, ViTConfig   # here, not at the top: models.py imports this module
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    kind = c.get("model_type")
    if kind not in HF_DEFAULTS:
        raise ValueError(f"{path}: model_type {kind!r} is neither 'clip' nor 'siglip'")
    clip = kind == "clip"
    tc = HF_DEFAULTS[kind]["text"] | (c.get("text_config") or {})
    vc = HF_DEFAULTS[kind]["vision"] | (c.get("vision_config") or {})
    mean, std = (OPENAI_MEAN, OPENAI_STD) if clip else ((0.5,) * 3, (0.5,) * 3)
    pre = os.path.join(path, "preprocessor_config.json")
    if os.path.exists(pre):
        with open(pre) as f:
            pc = json.load(f)
        mean, std = tuple(pc.get("image_mean", mean)), tuple(pc.get("image_std", std))
    sd = hf_weights(path)
    try:
        # image tower
        v = "vision_model."
        w = sd.pop(v + "embeddings.patch_embedding.weight")                          # (D, 3, p, p)
        Dv, p = w.shape[0], w.shape[-1]
        pos = sd.pop(v + "embeddings.position_embedding.weight")                     # (clip + N, D)
        depth = count_blocks(sd, v + "encoder.layers.")
        img = {"patch_embed.proj.weight": w, "pos_embed": pos[None],
               "patch_embed.proj.bias": sd.pop(v + "embeddings.patch_embedding.bias", torch.zeros(Dv))}
        img |= pairs(sd, "norm", v + "post_layernorm") | hf_blocks(sd, v + "encoder.layers.", depth)
        if clip:
            img |= {"cls_token": sd.pop(v + "embeddings.class_embedding").view(1, 1, Dv),
                    "proj.weight": sd.pop("visual_projection.weight")} | pairs(sd, "norm_pre", v + "pre_layrnorm")
        else:   # the MAP head: nn.MultiheadAttention's in_proj split into our q and kv
            h = v + "head."
            wi, bi = sd.pop(h + "attention.in_proj_weight"), sd.pop(h + "attention.in_proj_bias")
            img |= {"attn_pool.latent": sd.pop(h + "probe"), "attn_pool.q.weight": wi[:Dv], "attn_pool.q.bias": bi[:Dv],
                    "attn_pool.kv.weight": wi[Dv:], "attn_pool.kv.bias": bi[Dv:]}
            img |= (pairs(sd, "attn_pool.proj", h + "attention.out_proj") | pairs(sd, "attn_pool.norm", h + "layernorm")
                    | pairs(sd, "attn_pool.mlp.fc1", h + "mlp.fc1") | pairs(sd, "attn_pool.mlp.fc2", h + "mlp.fc2"))
        vcfg = ViTConfig(image_size=math.isqrt(pos.shape[0] - clip) * p, patch_size=p, dim=Dv, depth=depth,
                         heads=vc["num_attention_heads"], mlp_ratio=img["blocks.0.mlp.fc1.weight"].shape[0] / Dv,
                         pool="cls" if clip else "map", embed_dim=img["proj.weight"].shape[0] if clip else 0,
                         ln_eps=vc["layer_norm_eps"], norm_pre=clip, act=HF_ACT[vc["hidden_act"]], mean=mean, std=std)
        # text tower
        t = "text_model."
        tok = sd.pop(t + "embeddings.token_embedding.weight")                        # (V, D)
        V, Dt = tok.shape
        depth = count_blocks(sd, t + "encoder.layers.")
        txt = {"tok_embed.weight": pad_row(tok), "pos_embed": sd.pop(t + "embeddings.position_embedding.weight")[None]}
        txt |= pairs(sd, "norm", t + "final_layer_norm") | hf_blocks(sd, t + "encoder.layers.", depth)
        txt |= {"proj.weight": sd.pop("text_projection.weight")} if clip else pairs(sd, "proj", t + "head")
        tcfg = TextConfig(vocab_size=V + 1, context=txt["pos_embed"].shape[1], dim=Dt, depth=depth,
                          heads=tc["num_attention_heads"], mlp_ratio=txt["blocks.0.mlp.fc1.weight"].shape[0] / Dt,
                          embed_dim=txt["proj.weight"].shape[0], pad_id=V, ln_eps=tc["layer_norm_eps"],
                          act=HF_ACT[tc["hidden_act"]], causal=clip, pool="eos" if clip else "last",
                          fill_id=0 if clip else tc["pad_token_id"], proj_bias=not clip)
        extras = {"logit_scale": float(sd.pop("logit_scale")), "logit_bias": float(sd.pop("logit_bias", 0.0))}
    except KeyError as e:
        raise ValueError(f"{path} is not a {kind} checkpoint this loader knows: no weight {e}") from None
    no_leftovers(sd, path)
    return vcfg, tcfg, {f"image.{k}": x for k, x in img.items()} | {f"text.{k}": x for k, x in txt.items()}, extras


def load_clip_openai(path: str, quick_gelu: bool = True, model_cfg: dict | None = None,
                     mean: tuple = OPENAI_MEAN, std: tuple = OPENAI_STD) -> tuple[ViTConfig, TextConfig, dict, dict]:
    """A CLIP state dict in OpenAI's layout (OpenAI's and open_clip's ViT CLIP models: `visual.conv1`,
    `transformer.resblocks.i`, ...) -> as load_clip_hf. The weights do not say the activation
    (OpenAI's models use quick-GELU, most of open_clip's GELU) nor the heads: model_cfg, open_clip's
    model config (open_clip_config.json's "model_cfg"), says them where given; else quick_gelu and
    64-wide heads, OpenAI's."""
    from models import TextConfig, ViTConfig   # here, not at the top: models.py imports this module
    mc = model_cfg or {}
    vc, tc = mc.get("vision_cfg", {}), mc.get("text_cfg", {})
    if tc.get("pool_type", "argmax") != "argmax" or not isinstance(vc.get("layers", 1), int):
        raise ValueError(f"{path}: only open_clip's plain ViT CLIP (end-of-text pooling) is supported")
    # open_clip's configs name quick-GELU only where a model uses it (its CLIP class defaults to GELU):
    # with a config, a missing key means GELU; without one, the caller's quick_gelu (OpenAI's models)
    act = "quick_gelu" if (mc.get("quick_gelu", False) if model_cfg is not None else quick_gelu) else "gelu"
    sd = read_weights(path)
    for k in ("input_resolution", "context_length", "vocab_size"):  # scalars in OpenAI's TorchScript files
        sd.pop(k, None)
    try:
        w = sd.pop("visual.conv1.weight")                                           # (D, 3, p, p)
        Dv, p = w.shape[0], w.shape[-1]
        pos = sd.pop("visual.positional_embedding")                                  # (1 + N, D)
        depth = count_blocks(sd, "visual.transformer.resblocks.")
        img = {"patch_embed.proj.weight": w, "patch_embed.proj.bias": torch.zeros(Dv), "pos_embed": pos[None],
               "cls_token": sd.pop("visual.class_embedding").view(1, 1, Dv), "proj.weight": sd.pop("visual.proj").T}
        img |= (pairs(sd, "norm_pre", "visual.ln_pre") | pairs(sd, "norm", "visual.ln_post")
                | openai_blocks(sd, "visual.transformer.resblocks.", depth))
        vcfg = ViTConfig(image_size=math.isqrt(pos.shape[0] - 1) * p, patch_size=p, dim=Dv, depth=depth,
                         heads=Dv // vc.get("head_width", 64), mlp_ratio=img["blocks.0.mlp.fc1.weight"].shape[0] / Dv,
                         embed_dim=img["proj.weight"].shape[0], ln_eps=1e-5, norm_pre=True, act=act, mean=mean, std=std)
        tok = sd.pop("token_embedding.weight")                                       # (V, D)
        V, Dt = tok.shape
        depth = count_blocks(sd, "transformer.resblocks.")
        txt = {"tok_embed.weight": pad_row(tok), "pos_embed": sd.pop("positional_embedding")[None],
               "proj.weight": sd.pop("text_projection").T}
        txt |= pairs(sd, "norm", "ln_final") | openai_blocks(sd, "transformer.resblocks.", depth)
        tcfg = TextConfig(vocab_size=V + 1, context=txt["pos_embed"].shape[1], dim=Dt, depth=depth,
                          heads=tc.get("heads", Dt // 64), mlp_ratio=txt["blocks.0.mlp.fc1.weight"].shape[0] / Dt,
                          embed_dim=txt["proj.weight"].shape[0], pad_id=V, ln_eps=1e-5, act=act, causal=True,
                          pool="eos")
        extras = {"logit_scale": float(sd.pop("logit_scale")), "logit_bias": float(sd.pop("logit_bias", 0.0))}
    except KeyError as e:
        raise ValueError(f"{path} is not a CLIP state dict in OpenAI's layout: no weight {e}") from None
    no_leftovers(sd, path)
    return vcfg, tcfg, {f"image.{k}": x for k, x in img.items()} | {f"text.{k}": x for k, x in txt.items()}, extras
