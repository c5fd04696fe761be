"""ONNX export of the final incremental classifier, and inference with ONNX Runtime.

    python export.py DIR                                   # DIR/model.onnx, checked against PyTorch
    python export.py DIR --predict IMAGE "caption"         # top-5 class names with probabilities
    python export.py DIR --manifest FILE [--top-k 3]       # many: CSV/JSONL with fields image,text
    python export.py DIR --manifest FILE --check           # ORT vs PyTorch on those rows

DIR is one method's folder written by train.py (`<out>/<method>/`): model.pt (config, full state
with adapters unmerged, class names), the tokenizer (tokenizer.model, or vocab.txt, bpe.json,
spiece.model: data.TOKENIZER_FILES) and labels.json. The export folds the SSF
adapters into the frozen weights (prompt adapters stay; they are plain weights), traces
TwoTower.forward (images (B, 3, S, S) float 0..255, ids (B, L) int64 -> logits (B, C)) with a
dynamic batch axis and a dynamic caption length L <= context, and writes one self-contained file
(no external-data side file) beside the tokenizer and the label names. Image size, context, pad id
and modalities go into the file's metadata, so serving needs model.onnx, the tokenizer and
labels.json, and of this repository only data.py and text_tokens.py (images and captions are prepared
as in training), never train.py.

The graph is for ONNX Runtime: each attention is its fused contrib op com.microsoft.MultiHeadAttention
(CPU and CUDA kernels; the caption pad mask is its key_padding_mask, a causal text tower's mask, as
CLIP's, its attention_bias), which other ONNX runtimes do
not have. `--exporter portable` writes the same model with standard ONNX ops only (attention as
MatMul / Softmax / MatMul), slower on ONNX Runtime's CPU provider.

Preprocessing is the training code's own: data.load_image and data.encode_texts. Captions longer
than the model's context are truncated by encode_texts, keeping the end token (a note says so);
an empty caption is an error. Every error is one line starting with 'error:' and a non-zero exit.

From Python: `Predictor(DIR).predict(["a.png"], ["a red disc on the grass"])`.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
import warnings
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data as D
import models as M

if TYPE_CHECKING:   # for annotations only: onnxruntime is imported where a session is made
    import onnxruntime as ort

ONNX_NAME = "model.onnx"
TOL = 1e-4   # max |logit difference| ORT vs PyTorch in fp32 that export accepts


# ----------------------------------------------------------------------------- loading a run

def load_model(folder: str) -> tuple[M.TwoTower, list[str]]:
    """A trained run folder -> (the classifier with SSF merged, eval, fp32 on CPU; class names)."""
    path = os.path.join(folder, "model.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: no trained model in {folder} (model.pt not found; train.py writes it)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        cfg = M.ModelConfig.from_dict(ck["model_config"])
        model = M.TwoTower(cfg, n_classes=len(ck["class_names"]))
        model.load_state_dict(ck["state"])
    except Exception as e:  # a truncated or foreign file: say which, in one line
        raise SystemExit(f"error: cannot load {path}: {type(e).__name__}: {D.first_line(e)}") from None
    M.merge_ssf(model.float().eval())
    return model, list(ck["class_names"])


def _meta(model: M.TwoTower) -> dict[str, str]:
    """What a server needs besides the graph to prepare inputs (ONNX metadata is string -> string)."""
    c = model.cfg
    return {"exmask.image_size": str(c.vit.image_size), "exmask.context": str(c.text.context),
            "exmask.pad_id": str(c.text.pad_id), "exmask.modalities": c.modalities,
            "exmask.n_classes": str(model.n_classes)}


# ----------------------------------------------------------------------------- fused attention for ONNX Runtime

# The exported graph runs each attention as ONNX Runtime's fused contrib op com.microsoft.MultiHeadAttention
# (CPU and CUDA kernels) instead of MatMul / Softmax / MatMul with head-split transposes around them.
# How: during the export only (ort_fused), every models.Attention computes q, k and v with three 2-D
# Gemms (bias inside, no Split) and calls the custom op exmask::mha, whose eager kernel is SDPA and
# whose ONNX translation is that contrib op: the image tower with no mask, the text tower with the pad
# mask (ids != pad id) as key_padding_mask (a causal text tower: its (B, N, N) mask as attention_bias,
# exmask::mha_bias), and prompt adapters as a second MultiHeadAttention over the
# prompts' keys and values. Every models.Mlp runs its Linear layers as 2-D Gemms (ORT's CPU provider
# leaves a 3-D MatMul + Add unfused). The arithmetic is the model's own; models.py is not touched and
# the model is restored after the export. (The SigLIP pooling probe, AttentionPool, keeps plain attention.)

MS_DOMAIN = "com.microsoft"
_MASKED = float(torch.finfo(torch.float32).min)   # added to the scores of padded keys (SDPA: -inf)


def _mha_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
               heads: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, N, D), k (B, M, D), v (B, M, Dv), keep (B, M) int32 key mask (1 = attend) or None, bias
    (B, 1, N, M) float added to the scores (a causal text tower's mask) or None -> (B, N, Dv): multi-head
    attention with scale 1/sqrt(D / heads), heads split as models.Attention does."""
    B, N, _ = q.shape
    split = lambda t: t.reshape(B, t.shape[1], heads, -1).transpose(1, 2)   # (B, H, *, Dh)
    mask = bias if keep is None else keep.bool()[:, None, None, :]
    y = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return y.transpose(1, 2).reshape(B, N, v.shape[-1])


def _mha_bias_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, heads: int) -> torch.Tensor:
    return _mha_eager(q, k, v, None, heads, bias)


def _mha_op(biased: bool = False):
    """torch.ops.exmask.mha (a key mask) or, biased, torch.ops.exmask.mha_bias (scores + bias),
    defined on first use (once per process, even if this file is loaded twice)."""
    if not hasattr(torch.ops.exmask, "mha"):
        fake = lambda q, k, v, m, heads: q.new_empty(q.shape[0], q.shape[1], v.shape[2])
        op = torch.library.custom_op("exmask::mha", _mha_eager, mutates_args=(),
                                     schema="(Tensor q, Tensor k, Tensor v, Tensor? keep, int heads) -> Tensor")
        op.register_fake(fake)
        op = torch.library.custom_op("exmask::mha_bias", _mha_bias_eager, mutates_args=(),
                                     schema="(Tensor q, Tensor k, Tensor v, Tensor bias, int heads) -> Tensor")
        op.register_fake(fake)
    return torch.ops.exmask.mha_bias.default if biased else torch.ops.exmask.mha.default


def _mha_onnx(biased: bool = False) -> Callable:
    """exmask::mha -> com.microsoft.MultiHeadAttention(query, key, value, bias=None, key_padding_mask);
    exmask::mha_bias -> the same with attention_bias (input 5) in place of the key mask. onnx has no
    schema for ORT's contrib ops, so the part of it used here is declared (inputs 0-5 of 10, output 0
    of 4)."""
    import onnx
    import onnxscript
    S = onnx.defs.OpSchema
    arg = lambda name, typ, optional=False: S.FormalParameter(
        name, typ, param_option=S.FormalParameterOption.Optional if optional else S.FormalParameterOption.Single)
    schema = S("MultiHeadAttention", MS_DOMAIN, 1,
               inputs=[arg("query", "T"), arg("key", "T", True), arg("value", "T", True), arg("bias", "T", True),
                       arg("key_padding_mask", "M", True), arg("attention_bias", "T", True)],
               outputs=[arg("output", "T")],
               type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
               attributes=[S.Attribute("num_heads", S.AttrType.INT, "", required=True),
                           S.Attribute("mask_filter_value", S.AttrType.FLOAT, "", required=False),
                           S.Attribute("scale", S.AttrType.FLOAT, "", required=False)])
    mha = onnxscript.values.Op(onnxscript.values.Opset(MS_DOMAIN, 1), "MultiHeadAttention", schema)

    def translate(q, k, v, keep, heads: int):
        return mha(q, k, v, None, keep, num_heads=heads, mask_filter_value=_MASKED)

    def translate_biased(q, k, v, bias, heads: int):
        return mha(q, k, v, None, None, bias, num_heads=heads)
    return translate_biased if biased else translate


@torch.no_grad()
def _attention_consts(attn: M.Attention) -> dict[str, torch.Tensor] | None:
    """The constants of one attention in the fused graph: the q, k, v weights and biases (qkv's SSF
    folded in) and, with prompts, the prompts' keys and values with the per-head gate folded into
    the values (tanh(g) * attn(q, K, V) = attn(q, K, tanh(g) * V)). None: a layout not known here."""
    if not isinstance(attn.qkv_ssf, (M.SSF, nn.Identity)):
        return None
    D = attn.proj.in_features
    w, b = M.fold_ssf(attn.qkv.weight, attn.qkv.bias, attn.qkv_ssf)
    out = {}
    for i, n in enumerate("qkv"):
        out[f"{n}_weight"], out[f"{n}_bias"] = w[i * D:(i + 1) * D].clone(), b[i * D:(i + 1) * D].clone()
    if attn.prompt is not None:   # as in Attention.forward: from qkv, without qkv_ssf
        kv = attn.qkv(attn.prompt)[:, D:]                                         # (P, 2D)
        gate = torch.tanh(attn.prompt_gate).repeat_interleave(D // attn.heads)    # (D,): heads are D's blocks
        out["prompt_k"], out["prompt_v"] = kv[:, :D].clone(), (kv[:, D:] * gate).clone()
    return out


def _attention_fused(attn: M.Attention, x: torch.Tensor, keep: torch.Tensor | None = None, row: bool = False):
    """models.Attention.forward with the attention as exmask::mha, reading the constants that
    ort_fused put on `attn` as buffers named ort_*."""
    if row is not False:   # the pooling row is for training and exmask; the exported forward() never asks for it
        return type(attn).forward(attn, x, keep, row)
    B, N, D = x.shape
    mha = _mha_op()
    x2 = x.reshape(B * N, D)
    q, k, v = (F.linear(x2, getattr(attn, f"ort_{n}_weight"), getattr(attn, f"ort_{n}_bias")).view(B, N, D)
               for n in "qkv")
    if keep is not None and keep.dim() == 3:   # a causal text tower's (B, N, N) mask, as scores' bias
        bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, _MASKED)[:, None]
        y = _mha_op(biased=True)(q, k, v, bias, attn.heads)                     # (B, N, D)
    else:
        y = mha(q, k, v, None if keep is None else keep.to(torch.int32), attn.heads)
    if attn.prompt is not None:
        y = y + mha(q, attn.ort_prompt_k.expand(B, -1, -1), attn.ort_prompt_v.expand(B, -1, -1), None, attn.heads)
    return attn.proj_ssf(attn.proj(y.reshape(B * N, D))).view(B, N, D), None


def _mlp_2d(mlp: M.Mlp, x: torch.Tensor) -> torch.Tensor:
    """models.Mlp.forward on (tokens, D) rows: ONNX Gemms with the bias inside, not MatMul + Add."""
    h = M.activation(mlp.fc1_ssf(mlp.fc1(x.reshape(-1, x.shape[-1]))), mlp.act)
    return mlp.fc2_ssf(mlp.fc2(h)).view(*x.shape[:-1], -1)


@contextlib.contextmanager
def ort_fused(model: nn.Module):
    """Within the block, model's attentions call exmask::mha and its MLPs run as 2-D Gemms (see
    above): the same outputs, another graph. Undone on leaving, also after an error."""
    patched = []   # (module, names of the buffers added to it)
    try:
        for m in model.modules():
            if isinstance(m, M.Attention) and (consts := _attention_consts(m)) is not None:
                patched.append((m, [f"ort_{name}" for name in consts]))
                for name, t in consts.items():
                    m.register_buffer(f"ort_{name}", t, persistent=False)
                m.forward = functools.partial(_attention_fused, m)
            elif isinstance(m, M.Mlp):
                patched.append((m, []))
                m.forward = functools.partial(_mlp_2d, m)
        yield model
    finally:
        for m, names in patched:
            m.__dict__.pop("forward", None)
            for name in names:
                m._buffers.pop(name, None)


# ----------------------------------------------------------------------------- export

def example_inputs(model: M.TwoTower, batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images (B, 3, S, S) in 0..255 and ids (B, L) that look like encoded captions: position
    0 is the pooling token, later rows are padded shorter, so the pad mask is exercised."""
    g = torch.Generator().manual_seed(seed)
    S, tc = model.cfg.vit.image_size, model.cfg.text
    images = torch.randint(0, 256, (batch, 3, S, S), generator=g).float()
    ids = torch.randint(0, tc.vocab_size, (batch, length), generator=g)
    ids[ids == tc.pad_id] = (tc.pad_id + 1) % tc.vocab_size
    for b in range(1, batch):
        ids[b, max(2, length - b * 3):] = tc.pad_id
    return images, ids


def export_onnx(model: M.TwoTower, path: str, dynamo: bool = True, fused: bool = True) -> None:
    """Trace model.forward into one ONNX file at `path`, written to a temporary name first and then
    renamed, so a failed or interrupted export never leaves a half-written model.onnx.

    dynamo=True is torch.export + onnxscript, the exporter PyTorch supports; with fused (the default)
    each attention becomes ONNX Runtime's com.microsoft.MultiHeadAttention (see ort_fused), a graph
    only ONNX Runtime runs; fused=False keeps standard ONNX ops alone. dynamo=False is the deprecated
    TorchScript exporter (standard ops, plain attention), kept because it exports in a fraction of a
    second (bench.py measures them all)."""
    L = model.cfg.text.context
    # trace at batch 2 and the full context: torch.export specialises sizes 0 and 1
    args = example_inputs(model, 2, L)
    names = {"input_names": ["images", "ids"], "output_names": ["logits"]}
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # axis-naming notes, the TorchScript deprecation: nothing to act on
            if dynamo:
                batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("length", min=1, max=L)
                with ort_fused(model) if fused else contextlib.nullcontext():
                    prog = torch.onnx.export(
                        model, args, dynamo=True, external_data=False, verbose=False, **names,
                        dynamic_shapes={"images": {0: batch}, "ids": {0: batch, 1: length}},
                        custom_translation_table={_mha_op(): _mha_onnx(), _mha_op(True): _mha_onnx(True)}
                        if fused else None)
                # per-node stack traces name local source paths and are ~20 % of the file: drop them
                for node in prog.model.graph.all_nodes():
                    node.metadata_props.clear()
                prog.model.metadata_props.update(_meta(model))
                prog.save(tmp, external_data=False)
            else:
                import onnx
                torch.onnx.export(model, args, tmp, dynamo=False, opset_version=18, **names,
                                  dynamic_axes={"images": {0: "batch"}, "ids": {0: "batch", 1: "length"},
                                                "logits": {0: "batch"}})
                m = onnx.load(tmp)
                onnx.helper.set_model_props(m, _meta(model))
                onnx.save(m, tmp)
        os.replace(tmp, path)
    except Exception as e:  # the exporter's own messages run to pages; the first line says what broke
        raise SystemExit(f"error: ONNX export to {path} failed: {type(e).__name__}: {D.first_line(e, 300)}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def compare(model: M.TwoTower, session: "ort.InferenceSession", images: torch.Tensor, ids: torch.Tensor) -> dict:
    """ORT vs PyTorch (fp32, CPU) on the same inputs: max |logit difference| and top-1 agreement."""
    with torch.inference_mode():
        ref = model(images.float(), ids).numpy()
    out = session.run(["logits"], _feeds(session, images, ids))[0]
    return {"max_abs_diff": float(np.abs(out - ref).max()),
            "top1_agree": float((out.argmax(1) == ref.argmax(1)).mean()), "n": len(ids)}


def export_run(folder: str, verify: bool = True, dynamo: bool = True,
               log: Callable[[str], None] | None = None, fused: bool = True) -> str:
    """Export a trained run folder to folder/model.onnx (labels.json refreshed beside it) and return
    the path; dynamo and fused as in export_onnx. With verify, ONNX Runtime must match PyTorch within
    TOL at a batch size and caption length other than the traced ones before the file takes the name
    model.onnx; otherwise this raises SystemExit and any earlier model.onnx stays as it was."""
    t0 = time.perf_counter()
    model, class_names = load_model(folder)
    D.load_tokenizer(folder)  # a model without its tokenizer cannot be served: fail now, not later
    path = os.path.join(folder, ONNX_NAME)
    staged = f"{path}.staged{os.getpid()}"
    try:
        export_onnx(model, staged, dynamo, fused)
        secs = time.perf_counter() - t0
        msg = f"wrote {path} ({os.path.getsize(staged) / 1024:,.0f} KB) in {secs:.1f}s"
        if verify:
            images, ids = example_inputs(model, 3, max(1, model.cfg.text.context // 2 - 1), seed=1)
            where = f"batch 3, length {ids.shape[1]}"
            try:
                r = compare(model, session(staged, providers=["CPUExecutionProvider"]), images, ids)
            except Exception as e:  # e.g. a size fixed at trace time: the dynamic axes did not hold
                raise SystemExit(f"error: ONNX Runtime cannot run the export at {where}: "
                                 f"{type(e).__name__}: {D.first_line(e)}") from None
            if not (r["max_abs_diff"] <= TOL and r["top1_agree"] == 1.0):
                raise SystemExit(f"error: ONNX Runtime disagrees with PyTorch at {where} (max |diff| "
                                 f"{r['max_abs_diff']:.2e}, top-1 agreement {r['top1_agree']:.2f})")
            msg += f"; ORT vs PyTorch at {where}: max |diff| {r['max_abs_diff']:.1e}"
        os.replace(staged, path)
    finally:
        if os.path.exists(staged):
            os.remove(staged)
    D.write_json(os.path.join(folder, "labels.json"), class_names, indent=None)
    if log:
        log(msg)
    return path




# ----------------------------------------------------------------------------- ONNX Runtime

def gpu_present() -> bool:
    """True when a CUDA GPU is usable. ort.get_device() is no test: onnxruntime-gpu says 'GPU'
    on any machine, with or without one, so ask the CUDA driver through PyTorch."""
    return torch.cuda.is_available()


def session(path: str, providers: list[str] | None = None, threads: int = 0,
            opt_level: str = "all") -> "ort.InferenceSession":
    """An ORT session: the CUDA provider when a GPU is present, else the CPU provider. Log severity
    is 'error' so a CPU-only machine prints no warnings about CUDA; the providers actually in use
    are `session.get_providers()`. On the CPU provider alone ORT's SkipLayerNormFusion is off: it
    fuses each tower's last residual Add into its final LayerNorm, and the fused CPU kernel took
    ~0.6 ms where Add + LayerNormalization take ~0.15 ms (batch 32, default model)."""
    import onnxruntime as ort
    ort.set_default_logger_severity(3)
    if providers is None:
        providers = ["CPUExecutionProvider"]
        if gpu_present() and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
            if hasattr(ort, "preload_dlls"):  # the CUDA/cuDNN libraries PyTorch ships, when ORT lacks its own
                try:
                    ort.preload_dlls()
                except Exception:
                    pass
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[opt_level]
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    cpu_only = all((p[0] if isinstance(p, tuple) else p) == "CPUExecutionProvider" for p in providers)
    return ort.InferenceSession(path, so, providers=providers,
                                disabled_optimizers=["SkipLayerNormFusion"] if cpu_only else None)


def _feeds(sess, images: torch.Tensor, ids: torch.Tensor) -> dict:
    # an image-only or text-only model's graph has no input for the unused modality
    have = {i.name for i in sess.get_inputs()}
    feeds = {"images": images.float().numpy(), "ids": ids.long().numpy()}
    return {k: v for k, v in feeds.items() if k in have}


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class Predictor:
    """Serve an exported run: Predictor(DIR).predict(images, captions) -> top-k (class name, prob)
    per sample. Images are file paths or uint8 tensors (3, S, S); captions are strings."""

    def __init__(self, folder: str, providers: list[str] | None = None, threads: int = 0):
        path = os.path.join(folder, ONNX_NAME)
        if not os.path.exists(path):
            raise SystemExit(f"error: no {ONNX_NAME} in {folder} (run: python export.py {folder})")
        try:   # a truncated copy, or another program's ONNX file: one line, how to write it again
            self.session = session(path, providers, threads)
            meta = self.session.get_modelmeta().custom_metadata_map
            self.image_size, self.context = int(meta["exmask.image_size"]), int(meta["exmask.context"])
            self.pad_id, self.modalities = int(meta["exmask.pad_id"]), meta["exmask.modalities"]
        except Exception as e:
            what = f"no {e} in its metadata" if isinstance(e, KeyError) else D.first_line(e)
            raise SystemExit(f"error: cannot serve {path} ({type(e).__name__}: {what}); write it again with "
                             f"python export.py {folder}") from None
        labels = os.path.join(folder, "labels.json")
        if not os.path.exists(labels):
            raise SystemExit(f"error: no labels.json in {folder} (run: python export.py {folder})")
        try:
            with open(labels) as f:
                self.labels = json.load(f)
        except ValueError as e:
            raise SystemExit(f"error: cannot read {labels}: {e}") from None
        self.tok = D.load_tokenizer(folder)
        self.providers = self.session.get_providers()

    def truncated(self, captions: list[str]) -> list[int]:
        """Indices of the captions that encode_texts will cut to the model's context."""
        return [i for i, t in enumerate(captions) if len(self.tok.encode(t)) > self.context]

    def inputs(self, images: list, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's inputs, prepared exactly as in training: images (B, 3, S, S) float, ids (B, L)
        with L the longest caption in the batch (padding past it changes nothing but the cost)."""
        if len(images) != len(captions):
            raise SystemExit(f"error: {len(images)} images but {len(captions)} captions")
        if "text" in self.modalities:
            for i, t in enumerate(captions):
                if not str(t).strip():
                    raise SystemExit(f"error: empty caption (sample {i + 1}); this model reads the text")
        imgs = [D.load_image(x, self.image_size) if isinstance(x, (str, os.PathLike)) else x for x in images]
        S = self.image_size
        for i, x in enumerate(imgs):
            if tuple(x.shape) != (3, S, S):
                raise SystemExit(f"error: image {i + 1} has shape {tuple(x.shape)}, the model takes (3, {S}, {S})")
        imgs = torch.stack(imgs).float()
        ids = D.encode_texts(self.tok, [str(t) for t in captions], self.context)
        L = int((ids != self.pad_id).sum(1).max().clamp(min=1))
        return imgs, ids[:, :L]

    def logits(self, images: list, captions: list[str]) -> np.ndarray:
        imgs, ids = self.inputs(images, captions)
        return self.session.run(["logits"], _feeds(self.session, imgs, ids))[0]

    def predict(self, images: list, captions: list[str], top_k: int = 5) -> list[list[tuple[str, float]]]:
        p = softmax(self.logits(images, captions))
        top = np.argsort(-p, 1)[:, :top_k]
        return [[(self.labels[j], float(p[i, j])) for j in row] for i, row in enumerate(top)]


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="a trained method folder, e.g. runs/default/exmask")
    p.add_argument("--predict", nargs=2, metavar=("IMAGE", "CAPTION"), help="classify one image + caption")
    p.add_argument("--manifest", help="classify many: CSV/JSONL with fields image,text (label optional)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--check", action="store_true", help="with --manifest: compare ORT with PyTorch on its rows")
    p.add_argument("--exporter", choices=["dynamo", "portable", "torchscript"], default="dynamo",
                   help="torch.export + onnxscript with ONNX Runtime's fused attention (default); the same "
                        "with standard ONNX ops only, for other runtimes (portable); or the deprecated "
                        "TorchScript exporter (standard ops)")
    p.add_argument("--cpu", action="store_true", help="use the CPU provider even when a GPU is present")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = ORT's default)")
    a = p.parse_args(argv)
    if a.top_k < 1 or a.batch_size < 1:
        raise SystemExit("error: --top-k and --batch-size must be at least 1")
    if a.check and not a.manifest:
        raise SystemExit("error: --check needs --manifest")
    if a.predict and a.manifest:
        raise SystemExit("error: give --predict or --manifest, not both")

    serve = bool(a.predict or a.manifest)
    onnx_path, pt_path = os.path.join(a.dir, ONNX_NAME), os.path.join(a.dir, "model.pt")
    stale = not os.path.exists(onnx_path) or (os.path.exists(pt_path)
                                              and os.path.getmtime(onnx_path) < os.path.getmtime(pt_path))
    if not serve or stale:  # export on request, or when serving finds model.onnx missing or older than model.pt
        export_run(a.dir, dynamo=a.exporter != "torchscript", fused=a.exporter == "dynamo",
                   log=lambda m: print(m, file=sys.stderr if serve else sys.stdout))
    if not serve:
        return

    pred = Predictor(a.dir, providers=["CPUExecutionProvider"] if a.cpu else None, threads=a.threads)
    used = f"providers: {', '.join(pred.providers)}"   # said once the rows are served: an error stays one line
    if a.predict:
        rows = [{"image": a.predict[0], "path": a.predict[0], "text": a.predict[1]}]
    else:
        rows = D.read_rows(a.manifest, required=("image", "text"))
    for i in pred.truncated([r["text"] for r in rows]):
        print(f"note: caption {i + 1} is longer than the model's context ({pred.context} tokens); "
              f"truncated, the end token kept", file=sys.stderr)
    if a.check:
        model, _ = load_model(a.dir)
        imgs, ids = pred.inputs([r["path"] for r in rows], [r["text"] for r in rows])
        r = compare(model, pred.session, imgs, ids)
        print(f"ORT vs PyTorch on {r['n']} rows: max |logit diff| {r['max_abs_diff']:.2e}, "
              f"top-1 agreement {100 * r['top1_agree']:.1f}%")
        print(used, file=sys.stderr)
        if not (r["max_abs_diff"] <= TOL and r["top1_agree"] == 1.0):
            raise SystemExit(f"error: parity check failed (tolerance {TOL})")
        return

    correct = labelled = 0
    for s in range(0, len(rows), a.batch_size):
        chunk = rows[s:s + a.batch_size]
        tops = pred.predict([r["path"] for r in chunk], [r["text"] for r in chunk], a.top_k)
        for r, top in zip(chunk, tops):
            if a.predict:
                print("\n".join(f"{k + 1}. {name}  {prob:.4f}" for k, (name, prob) in enumerate(top)))
            else:
                print(f"{r['image']}\t" + "\t".join(f"{name} {prob:.4f}" for name, prob in top))
            if r.get("label") not in (None, ""):
                labelled += 1
                correct += top[0][0] == str(r["label"])
    print(used, file=sys.stderr)
    if labelled:
        print(f"top-1 accuracy on {labelled} labelled rows: {100 * correct / labelled:.2f}%", file=sys.stderr)


if __name__ == "__main__":
    main()
