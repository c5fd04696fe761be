"""Tests for CLIP and SigLIP towers (#11): both towers and the similarity logits against the reference
implementations (transformers' CLIPModel and SiglipModel, open_clip's CLIP) on tiny random checkpoints
the tests write themselves, the tokenizers against the reference tokenizers, the text tower's new
pooling and masks, training with --clip (the context term runs: one embedding space), and the ONNX
export. The reference libraries are dev dependencies (requirements-dev.txt, which CI installs);
the tests import them as they import torch (a missing one fails, never skips). Nothing is downloaded."""
from __future__ import annotations

import io
import json
import os

import onnx
import pytest
import torch

import data as D
import exmask
import export as E
import models as M
import towers

torch.set_num_threads(2)
TOL = 1e-5
WORDS = ["a", "photo", "of", "the", "cat", "dog", "on", "grass", "sky", "snow", "in", "with", "red", "small", "big",
         "picture"]
CAPTIONS = ["a photo of a cat on the grass", "A DOG in the snow!", "red", "the small cat, with a big dog: in the sky?",
            "picture of grass " * 9]


# ----------------------------------------------------------------------------- tiny checkpoints

def tiny_clip_vocab(folder: str) -> dict:
    """A CLIP BPE vocabulary written as Hugging Face's vocab.json + merges.txt: the 512 byte
    characters (alone and word-final), merges that spell WORDS, the two special tokens last."""
    chars = list(D.bytes_to_unicode().values())
    merges = []
    for w in WORDS:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            m = f"{parts[0]} {parts[1]}"
            if m not in merges:
                merges.append(m)
            parts = [parts[0] + parts[1]] + parts[2:]
    words = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab = {w: i for i, w in enumerate(words + ["<|startoftext|>", "<|endoftext|>"])}
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab


def tiny_spiece(folder: str) -> int:
    """A SentencePiece model laid out as SigLIP's (<pad> 0, </s> 1, <unk> 2, no start token) at
    folder/spiece.model; returns its vocabulary size."""
    import sentencepiece as spm
    buf = io.BytesIO()
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, vocab_size=60, model_type="unigram",
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
                                   unk_piece="<unk>", hard_vocab_limit=False, minloglevel=2)
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(buf.getvalue())
    return spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size()


@torch.no_grad()
def shake(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter moved at random (no zero bias, no identity LayerNorm, a logit bias that is
    not 0): a parity test then checks every weight's way in."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.1)


def write_hf(kind: str, folder: str) -> torch.nn.Module:
    """A tiny random CLIPModel or SiglipModel (width 32, 2 blocks, 4 heads, 32 px, patch 8) saved
    with save_pretrained, its tokenizer files beside it; returns the reference model (eval)."""
    import transformers
    os.makedirs(folder, exist_ok=True)
    blocks = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    vision = blocks | {"image_size": 32, "patch_size": 8}
    if kind == "clip":
        vocab = tiny_clip_vocab(folder)
        text = blocks | {"vocab_size": len(vocab), "max_position_embeddings": 16, "bos_token_id": vocab["<|startoftext|>"],
                         "eos_token_id": vocab["<|endoftext|>"], "pad_token_id": vocab["<|endoftext|>"]}
        torch.manual_seed(0)
        ref = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
    else:
        text = blocks | {"vocab_size": tiny_spiece(folder), "max_position_embeddings": 16, "pad_token_id": 1}
        torch.manual_seed(0)
        ref = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
    shake(ref)
    ref.save_pretrained(folder)
    return ref.eval()


def reference_inputs(kind: str, folder: str, vcfg: M.ViTConfig, captions: list[str]) -> tuple:
    """The reference's inputs for random images and `captions`, prepared as its own tokenizer and
    processor do: pixels normalised, ids padded (SigLIP: to the full context, as it was trained)."""
    import transformers
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (len(captions), 3, vcfg.image_size, vcfg.image_size), generator=g).float()
    pixels = (images / 255 - torch.tensor(vcfg.mean).view(3, 1, 1)) / torch.tensor(vcfg.std).view(3, 1, 1)
    if kind == "clip":
        tok = transformers.CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
        text = tok(captions, padding=True, truncation=True, max_length=16, return_tensors="pt")
    else:
        tok = transformers.SiglipTokenizer(os.path.join(folder, "spiece.model"))
        # as SigLIP was trained and its processor prepares text: </s> to the full context, no mask
        text = {"input_ids": tok(captions, padding="max_length", truncation=True, max_length=16, return_tensors="pt")["input_ids"]}
    return images, pixels, dict(text)


# ----------------------------------------------------------------------------- parity with the references

@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_towers_and_logits_match_transformers(kind, tmp_path):
    """Loaded through towers.clip_tower (weights, config, tokenizer): image embeddings, text
    embeddings and the image-text logits equal the reference's within 1e-5 in fp32, the captions
    encoded by our tokenizer into the ids the reference's tokenizer gives."""
    folder = str(tmp_path / kind)
    ref = write_hf(kind, folder)
    vcfg, tcfg, state, tok = towers.clip_tower(folder)
    _, _, _, extras = M.load_clip_hf(folder)
    model = M.TwoTower(M.ModelConfig(vit=vcfg, text=tcfg, adapter="none", shared_space=True), 2).eval()
    assert set(model.load_state_dict(state, strict=False).missing_keys) == {"head.weight", "head.bias"}
    images, pixels, text = reference_inputs(kind, folder, vcfg, CAPTIONS)
    ids = D.encode_texts(tok, CAPTIONS, tcfg.context)                                   # (B, context)
    real = text.get("attention_mask", torch.ones_like(text["input_ids"])).bool()
    want = [row[m].tolist() for row, m in zip(text["input_ids"], real)]
    if kind == "siglip":   # the reference's padding is </s> to the full context: ours is the tower's fill
        want = [row[:row.index(tok.eos_id) + 1] for row in want]
    assert [row[row != tok.pad_id].tolist() for row in ids] == want
    with torch.no_grad():
        out = ref(pixel_values=pixels, **text)
        ri = ref.get_image_features(pixel_values=pixels).pooler_output
        rt = ref.get_text_features(**text).pooler_output
        ei, et = model.image.forward_images(images), model.text(ids)
        logits = M.similarity(ei, et, extras["logit_scale"], extras["logit_bias"])
    diffs = {"image": (ei - ri).abs().max().item(), "text": (et - rt).abs().max().item(),
             "logits": (logits - out.logits_per_image).abs().max().item()}
    print(kind, diffs)
    assert max(diffs.values()) <= TOL, diffs
    assert extras["logit_bias"] != 0 if kind == "siglip" else extras["logit_bias"] == 0


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_openai_layout_matches_open_clip(quick_gelu, tmp_path):
    """An open_clip CLIP state dict (OpenAI's key layout) in a folder as open_clip writes one (weights,
    open_clip_config.json saying the activation and the heads, the BPE files): both towers equal
    open_clip's encode_image / encode_text within 1e-5."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    vocab = tiny_clip_vocab(str(tmp_path))
    mc = {"embed_dim": 24,
          "vision_cfg": {"layers": 2, "width": 32, "head_width": 8, "patch_size": 8, "image_size": 32},
          "text_cfg": {"context_length": 16, "vocab_size": len(vocab), "width": 32, "heads": 4, "layers": 2}}
    if quick_gelu:   # open_clip's own configs name it only where a model uses it (the -quickgelu ones)
        mc["quick_gelu"] = True
    torch.manual_seed(0)
    ref = CLIP(24, CLIPVisionCfg(**mc["vision_cfg"]), CLIPTextCfg(**mc["text_cfg"]), quick_gelu=quick_gelu)
    shake(ref)
    ref.eval()
    torch.save(ref.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    with open(tmp_path / "open_clip_config.json", "w") as f:
        json.dump({"model_cfg": mc, "preprocess_cfg": {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.25]}}, f)
    vcfg, tcfg, state, tok = towers.clip_tower(str(tmp_path))
    assert vcfg.act == tcfg.act == ("quick_gelu" if quick_gelu else "gelu") and vcfg.heads == 4 and vcfg.mean == (0.4, 0.5, 0.6)
    model = M.TwoTower(M.ModelConfig(vit=vcfg, text=tcfg, adapter="none"), 2).eval()
    model.load_state_dict(state, strict=False)
    images = torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(1)).float()
    pixels = (images / 255 - torch.tensor(vcfg.mean).view(3, 1, 1)) / torch.tensor(vcfg.std).view(3, 1, 1)
    ids = D.encode_texts(tok, CAPTIONS[:3], tcfg.context)
    with torch.no_grad():
        theirs = torch.where(ids == tok.pad_id, 0, ids)           # open_clip pads with 0 and pools the highest id
        di = (model.image.forward_images(images) - ref.encode_image(pixels)).abs().max().item()
        dt = (model.text(ids) - ref.encode_text(theirs)).abs().max().item()
    print("open_clip", quick_gelu, di, dt)
    assert di <= TOL and dt <= TOL
    # the same weights as one file without open_clip's config are read as OpenAI's: quick-GELU
    assert M.load_clip_openai(str(tmp_path / "open_clip_pytorch_model.bin"))[1].act == "quick_gelu"


def test_clip_tokenizer_matches_open_clip_and_transformers(tmp_path):
    """ClipTokenizer on CLIP's real vocabulary (the merges file open_clip ships) gives open_clip's
    ids, and, written as vocab.json + merges.txt, Hugging Face's CLIPTokenizer's (which leaves HTML
    entities as they are; OpenAI's and ours unescape them)."""
    import transformers
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    ours, ref = D.ClipTokenizer.load(default_bpe()), SimpleTokenizer()
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (49406, 49407, 49408)
    texts = ["a photo of a cat", "A DOG's life, isn't it?!", "naïve café – 3.14 apples & 42 pears",
             "  many   spaces\tand\nlines ", "emoji 🙂 and 中文字符", "don't you'll we'd they're I'm", "x²+y³ ½",
             "hello...world!!!", "", "&amp; &lt;b&gt;"]
    for t in texts:
        assert ours.encode(t) == [ref.sot_token_id, *ref.encode(t), ref.eot_token_id], t
    with open(tmp_path / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(ours.vocab, f)
    with open(tmp_path / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(ours.merges) + "\n")
    hf = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    for t in texts[:-1]:
        assert ours.encode(t) == hf(t)["input_ids"], t
    ours.save(str(tmp_path / "bpe.json"))
    again = D.load_tokenizer(str(tmp_path))      # bpe.json, the name a run folder holds it under
    assert isinstance(again, D.ClipTokenizer) and D.tokenizer_filename(again) == "bpe.json"
    assert all(again.encode(t) == ours.encode(t) for t in texts)


def test_siglip_tokenizer_matches_transformers(tmp_path):
    """SiglipTokenizer gives Hugging Face's SiglipTokenizer's ids (lower case, punctuation dropped,
    </s> last, no start token); its pad id is one past the vocabulary."""
    import transformers
    n = tiny_spiece(str(tmp_path))
    ours, hf = D.SiglipTokenizer.load(str(tmp_path / "spiece.model")), transformers.SiglipTokenizer(str(tmp_path / "spiece.model"))
    assert (ours.eos_id, ours.pad_id, ours.vocab_size) == (1, n, n + 1)
    for t in [*CAPTIONS, "Zebra ünïcode 42", "", "  "]:
        assert ours.encode(t) == hf(t)["input_ids"], t
    assert isinstance(D.load_tokenizer(str(tmp_path)), D.SiglipTokenizer)


# ----------------------------------------------------------------------------- the text tower's new parts

def tiny_text(**kw) -> M.TextTransformer:
    torch.manual_seed(0)
    cfg = M.TextConfig(vocab_size=40, context=12, dim=32, depth=2, heads=4, embed_dim=24, pad_id=39, **kw)
    return M.TextTransformer(cfg).eval()


@pytest.mark.parametrize("kw", [{"causal": True, "pool": "eos", "act": "quick_gelu"},
                                {"pool": "last", "fill_id": 1, "proj_bias": True, "act": "gelu_tanh"}],
                         ids=["clip", "siglip"])
def test_kept_tokens_at_their_positions_equal_the_full_caption_and_padding_is_inert(kw):
    """CLIP- and SigLIP-style text towers: the whole caption packed as exmask replays it (pack_tokens)
    gives the full forward; padding a caption longer changes nothing; a masked caption's tokens keep
    their positions (causality and SigLIP's fill go by position, not by order)."""
    tower = tiny_text(**kw)
    ids = torch.tensor([[0, 5, 6, 7, 8, 2] + [39] * 6, [0, 9, 2] + [39] * 9])
    with torch.no_grad():
        full = tower(ids)
        packed, pos = exmask.pack_tokens(ids, None, 39)
        torch.testing.assert_close(tower(packed, pos), full, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tower(ids[:, :6]), full, atol=1e-5, rtol=1e-5)
        keep = torch.zeros_like(ids, dtype=torch.bool)
        keep[0, [0, 2, 4, 5]] = True
        keep[1, [0, 2]] = True
        k_ids, k_pos = exmask.pack_tokens(ids, keep, 39)
        a = tower(k_ids, k_pos)
        # the same kept tokens in another order at the same positions, the end token still last
        order = torch.tensor([[1, 0, 2, 3], [0, 1, 2, 3]])
        torch.testing.assert_close(tower(k_ids.gather(1, order), k_pos.gather(1, order)), a, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(a[0], full[0], atol=1e-3)


def test_causal_eos_pooling_and_its_attention_row():
    """CLIP-style tower: a token's features do not depend on tokens at later positions; the last token
    (the end of text) pools; with aux, the row is its attention over the caption (a distribution
    over the real tokens, 0 on padding)."""
    tower = tiny_text(causal=True, pool="eos")
    ids = torch.tensor([[0, 5, 6, 2, 39, 39]])
    with torch.no_grad():
        emb, (row, tok) = tower(ids, aux=True)
        longer, (_, tok2) = tower(torch.tensor([[0, 5, 6, 2, 7, 39]]), aux=True)
    torch.testing.assert_close(tok2[:, :4], tok[:, :4])                 # causal
    torch.testing.assert_close(emb, tok[:, 3])                          # pooled at the end token
    assert not torch.allclose(longer, emb, atol=1e-4)                  # now pooled at the token 7
    torch.testing.assert_close(row.sum(1), torch.ones(1))
    assert (row[0, 4:] == 0).all() and (row[0, :4] > 0).all() and tok.shape == (1, 6, 24)


def test_unknown_pooling_or_activation_is_refused():
    with pytest.raises(ValueError, match="text pool"):
        tiny_text(pool="max")
    with pytest.raises(ValueError, match="activation"):
        tiny_text(act="relu")


def test_siglip_map_head_token_features_are_the_pool_with_one_token():
    """The MAP head's per-token features (the context term's image tokens for SigLIP) are the pooled
    output of the probe looking at that token alone."""
    torch.manual_seed(0)
    pool = M.AttentionPool(16, 4, 2.0, 1e-6, "gelu_tanh")
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        tok = pool.tokens(x)
        for j in range(5):
            torch.testing.assert_close(tok[:, j], pool(x[:, j:j + 1])[0])


# ----------------------------------------------------------------------------- training and export

@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_train_with_clip_runs_exmask_with_the_context_term(kind, tmp_path, monkeypatch):
    """train.py --clip DIR: both towers from the checkpoint, one embedding space, so exmask's text mask
    scores tokens with the context term (text tokens against the discarded patches in the shared
    space); the run saves the checkpoint's own tokenizer beside the model, and exports to ONNX."""
    import train as T
    from test_exmask import tiny_train_cfg
    folder = str(tmp_path / kind)
    write_hf(kind, folder)
    calls = []
    real = exmask.context_scores
    monkeypatch.setattr(exmask, "context_scores", lambda *a: calls.append(a[0].shape) or real(*a))
    cfg = tiny_train_cfg(tmp_path, methods="exmask", clip=folder, keep_text=0.5, export=True)
    mcfg, _, _ = towers.backbone(cfg, "cpu", T.console(cfg))
    assert mcfg.shared_space and mcfg.adapter == "ssf" and mcfg.text.pool == ("eos" if kind == "clip" else "last")
    r = T.train(cfg)[0]
    assert r["memory"]["exemplars"] > 0 and calls and calls[0][-1] == (24 if kind == "clip" else 32)
    out = os.path.join(cfg.out, "exmask")
    assert os.path.exists(os.path.join(out, "bpe.json" if kind == "clip" else "spiece.model"))
    assert os.path.exists(os.path.join(out, "model.onnx"))      # export_run checked ORT against PyTorch
    pred = E.Predictor(out)
    assert pred.pad_id == mcfg.text.pad_id
    assert len(pred.predict([torch.zeros(3, 32, 32, dtype=torch.uint8)], ["a cat"])[0]) == len(pred.labels)
    got = []
    monkeypatch.setattr(T, "train", got.append)
    T.main(["--clip", folder, "--out", str(tmp_path / "o")])
    assert got[0].clip == folder and T.Config().clip == ""


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_export_parity_on_clip_towers(kind, tmp_path):
    """The incremental classifier on CLIP / SigLIP towers (trained SSF merged, a grown head) exports to
    ONNX; ORT's logits equal PyTorch's at batch sizes and caption lengths other than the traced ones,
    with the fused attention (CLIP's causal mask as its attention_bias) and with standard ops only."""
    folder = str(tmp_path / kind)
    write_hf(kind, folder)
    vcfg, tcfg, state, _ = towers.clip_tower(folder)
    model = M.TwoTower(M.ModelConfig(vit=vcfg, text=tcfg, shared_space=True), 3)
    model.load_state_dict(state, strict=False)
    shake(model, seed=2)                                      # SSF and head away from their start
    M.merge_ssf(model.eval())
    for fused in (True, False):
        path = str(tmp_path / f"{kind}-{fused}.onnx")
        E.export_onnx(model, path, fused=fused)
        mha = [n for n in onnx.load(path).graph.node if n.op_type == "MultiHeadAttention"]
        biased = [n for n in mha if len(n.input) > 5 and n.input[5]]      # CLIP's causal mask as attention_bias
        assert (len(mha), len(biased)) == ((vcfg.depth + tcfg.depth, tcfg.depth * tcfg.causal) if fused else (0, 0))
        sess = E.session(path, providers=["CPUExecutionProvider"])
        for B, L in ((3, 5), (1, 16), (2, 1)):
            r = E.compare(model, sess, *E.example_inputs(model, B, L, seed=B))
            print(kind, "fused" if fused else "portable", B, L, r["max_abs_diff"])
            assert r["max_abs_diff"] <= 1e-5 and r["top1_agree"] == 1.0


def test_clip_option_errors(tmp_path):
    """--clip with --vit or --text-model, a missing path, a folder that is no checkpoint, a CLIP
    folder without its tokenizer: each one error line."""
    import train as T
    from test_exmask import tiny_train_cfg
    cfg = tiny_train_cfg(tmp_path, clip=str(tmp_path), vit="vit_tiny_patch16_224")
    with pytest.raises(SystemExit, match="without --vit"):
        towers.backbone(cfg, "cpu", T.console(cfg))
    with pytest.raises(SystemExit, match="no such file"):
        towers.clip_tower(str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match="neither a Hugging Face folder"):
        towers.clip_tower(str(tmp_path))
    (tmp_path / "bert").mkdir()
    with open(tmp_path / "bert" / "config.json", "w") as f:
        json.dump({"model_type": "bert"}, f)
    with pytest.raises(SystemExit, match="neither 'clip' nor 'siglip'"):
        towers.clip_tower(str(tmp_path / "bert"))
    folder = str(tmp_path / "clip")
    write_hf("clip", folder)
    os.remove(os.path.join(folder, "merges.txt"))
    with pytest.raises(SystemExit, match="no tokenizer"):
        towers.clip_tower(folder)


def test_towers_cached_before_the_clip_fields_keep_their_cache_key():
    """The fields CLIP and SigLIP added are left out of the default towers' cache key at their
    defaults (the key is what it was before them), and count once they differ."""
    from dataclasses import asdict, replace

    import towers
    from train import Config
    c = Config().model
    assert towers.key_fields(c.vit) == {k: v for k, v in asdict(c.vit).items() if k not in ("norm_pre", "act")}
    assert "pool" in towers.key_fields(c.vit)                       # the ViT's own pool predates them
    assert towers.key_fields(replace(c.text, causal=True))["causal"] is True
    assert towers.key_fields(replace(c.vit, act="quick_gelu"))["act"] == "quick_gelu"
    assert "vocab_size" not in towers.key_fields(c.text, skip=("vocab_size",))
