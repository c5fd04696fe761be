"""Tests of the real-image development set (data.py icons, recipes.py), the validation split, and the rules that
choose which patches a masked exemplar keeps. CPU only, tiny seeded configs. Run: python -m pytest -q"""
import csv
import dataclasses
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

import data as D
import exmask
import exemplars as E
import models as M
import recipes as R
import towers
from test_exmask import tiny_batch, tiny_model_cfg, tiny_train_cfg

torch.set_num_threads(2)


# ----------------------------------------------------------------------------- icons

def fake_theme_tree(root, themes=("alpha", "beta", "gamma"), names=("printer", "folder", "user-trash", "rare")):
    """Icon themes in the freedesktop layouts real themes use (48x48/cat, cat/48, scalable is skipped
    without rsvg), each icon a distinct shape with an alpha channel. "rare" is drawn by one theme only;
    "trashcan" is a link to user-trash (another name for the same drawing)."""
    from PIL import Image, ImageDraw
    for t_i, t in enumerate(themes):
        for n_i, name in enumerate(names):
            if name == "rare" and t_i:
                continue
            d = os.path.join(root, t, "48x48" if t_i % 2 == 0 else "devices", "devices" if t_i % 2 == 0 else "48")
            os.makedirs(d, exist_ok=True)
            im = Image.new("RGBA", (48, 48), (0, 0, 0, 0))
            draw = ImageDraw.Draw(im)
            box = (8 + 2 * n_i, 8, 40, 40 - 3 * t_i)
            [draw.ellipse, draw.rectangle, draw.polygon][n_i % 3](
                box if n_i % 3 < 2 else [(24, 6), (42, 42), (6, 42)], fill=(40 * n_i, 90 + 50 * t_i, 200, 255))
            im.save(os.path.join(d, name + ".png"))
            small = os.path.join(root, t, "16x16", "devices")          # too small: ignored
            os.makedirs(small, exist_ok=True)
            im.resize((16, 16)).save(os.path.join(small, name + ".png"))
            if name == "user-trash":
                os.symlink(name + ".png", os.path.join(d, "trashcan.png"))
    return root


def tiny_model_and_data(cfg) -> tuple:
    """The tiny towers (pretrained once, cached) with a head of 4 classes, and cfg's data prepared."""
    import train as T
    mcfg, state, tok = towers.backbone(cfg, "cpu", T.console(cfg))
    data = T.prepare(T.read_data(cfg, mcfg.vit.image_size), cfg, mcfg, tok)
    model = M.TwoTower(mcfg, 4)
    model.load_state_dict(state, strict=False)
    return mcfg, data, model


def test_icons_builder_writes_a_manifest_with_object_masks(tmp_path):
    root = fake_theme_tree(str(tmp_path / "icons"))
    path = R.build_icons(root, str(tmp_path / "out"), ("alpha", "beta", "gamma"), n_classes=3, per_class=10,
                         min_themes=2, size=32, log=lambda *a: None)
    rows = list(csv.DictReader(open(path)))
    assert sorted({r["label"] for r in rows}) == ["folder", "printer", "user-trash"]   # not "rare", not the link
    assert len(rows) == 30 and sum(r["split"] == "test" for r in rows) == 6            # 20 % of each class
    for c in ("folder", "printer", "user-trash"):
        assert sum(r["split"] == "test" for r in rows if r["label"] == c) == 2
    raw = D.read_manifest(path, 16, cache_dir=str(tmp_path / "cache"))
    assert raw["images"].shape == (30, 3, 16, 16) and raw["objects"].shape == (30, 16, 16)
    share = (raw["objects"] > 127).float().mean((1, 2))
    assert (share > 0.05).all() and (share < 0.6).all()                                # a minority of the image
    # the mask is where the icon is: every fake icon is filled with blue 200, which the backgrounds are not
    from PIL import Image
    out = os.path.dirname(path)
    for r in rows:
        assert r["text"] and r["mask"].startswith("masks/")
        img = np.asarray(Image.open(os.path.join(out, r["image"])).convert("RGB")).astype(float)
        on = np.asarray(Image.open(os.path.join(out, r["mask"])).convert("L")) > 127
        assert np.median(abs(img[on][:, 2] - 200)) < 2 and abs(img[~on][:, 2] - 200).mean() > 5   # edges blend
    again = R.build_icons(root, str(tmp_path / "again"), ("alpha", "beta", "gamma"), n_classes=3, per_class=10,
                          min_themes=2, size=32, log=lambda *a: None)
    assert open(again).read().replace("again", "out") == open(path).read()              # seeded
    with pytest.raises(SystemExit, match="only 3 icon names"):
        R.build_icons(root, str(tmp_path / "x"), ("alpha", "beta", "gamma"), n_classes=5, min_themes=2,
                      log=lambda *a: None)
    with pytest.raises(SystemExit, match="none of the themes"):
        R.build_icons(root, str(tmp_path / "x"), ("nope",), log=lambda *a: None)


def test_icons_cli(tmp_path):
    root = fake_theme_tree(str(tmp_path / "icons"))
    R.main(["icons", str(tmp_path / "out"), "--themes-root", root, "--themes", "alpha,beta,gamma", "--classes", "2",
            "--per-class", "5", "--min-themes", "3", "--size", "24"])
    rows = list(csv.DictReader(open(tmp_path / "out" / "manifest.csv")))
    assert len(rows) == 10 and len({r["label"] for r in rows}) == 2


# ----------------------------------------------------------------------------- splits

def test_validation_is_carved_from_training_rows_and_the_test_split_ignores_the_seed(tmp_path):
    import train as T
    labels = torch.arange(4).repeat_interleave(10)
    is_test = (torch.arange(40) % 10) >= 8
    val = D.carve_validation(labels, is_test, 0.25)
    assert not (val & is_test).any() and all(int(val[labels == c].sum()) == 2 for c in range(4))
    assert torch.equal(val, D.carve_validation(labels, is_test, 0.25))
    # a manifest without a split column: the same test rows for every run seed
    root = fake_theme_tree(str(tmp_path / "icons"))
    path = R.build_icons(root, str(tmp_path / "out"), ("alpha", "beta", "gamma"), n_classes=3, per_class=10,
                         min_themes=2, size=32, log=lambda *a: None)
    lines = open(path).read().splitlines()
    nosplit = tmp_path / "out" / "nosplit.csv"
    nosplit.write_text("\n".join(",".join(ln.split(",")[:3]) for ln in lines) + "\n")
    cfg = tiny_train_cfg(tmp_path, data=str(nosplit))
    a, b = T.read_data(replace(cfg, seed=0), 32), T.read_data(replace(cfg, seed=5), 32)
    assert torch.equal(a["is_test"], b["is_test"])
    v = T.read_data(replace(cfg, val=0.25), 32)
    assert not (v["is_test"] & a["is_test"]).any() and not (v["is_train"] & (v["is_test"] | a["is_test"])).any()
    with pytest.raises(ValueError, match="val"):
        T.Config(val=1.0)


def test_val_run_reports_on_validation_rows_only(tmp_path, monkeypatch):
    import train as T
    seen = []
    real = T.evaluate

    def spy(model, data, *a, **k):
        seen.append(data["is_test"].clone())
        return real(model, data, *a, **k)

    monkeypatch.setattr(T, "evaluate", spy)
    cfg = tiny_train_cfg(tmp_path, val=0.25)
    r = T.train(cfg)[0]
    raw = D.make_synth(cfg.synth)
    assert r["eval_split"] == "val" and not (seen[0] & raw["is_test"]).any() and seen[0].any()


# ----------------------------------------------------------------------------- patch rules

def test_spread_scores_take_every_region_first():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(5, 64, generator=g)
    s[:, :8] += 10                                           # one strong row would win plain top-k
    idx = exmask.keep_top(exmask.spread_scores(s, 8), 16)
    regions = (idx // 8 // 2) * 4 + (idx % 8) // 2
    assert all(len(set(r.tolist())) == 16 for r in regions)
    plain = exmask.keep_top(s, 16)
    assert all(len(set(((r // 8 // 2) * 4 + (r % 8) // 2).tolist())) < 16 for r in plain)
    # within a region the best patch is the one kept
    best = s.reshape(5, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(5, 16, 4).argmax(-1)      # (5, 16) in-region
    r, c = torch.arange(16) // 4, torch.arange(16) % 4
    best_flat = (2 * r + best // 2) * 8 + 2 * c + best % 2                                    # (5, 16) grid index
    assert all(set(b.tolist()) == set(i.tolist()) for b, i in zip(best_flat, idx))


def test_sample_scores_draw_in_proportion_to_scores():
    g = torch.Generator().manual_seed(0)
    s = torch.ones(2000, 8)
    s[:, 0] = 7.0                                            # 7 / 14 of the mass on patch 0
    first = exmask.keep_top(exmask.sample_scores(s, torch.rand(s.shape, generator=g)), 1)[:, 0]
    assert abs((first == 0).float().mean().item() - 0.5) < 0.05
    cold = exmask.keep_top(exmask.sample_scores(s, torch.rand(s.shape, generator=g), temperature=0.05), 1)[:, 0]
    assert (cold == 0).float().mean() > 0.99


@pytest.mark.parametrize("rule", ["attn", "spread", "sample", "class", "feature", "paper", "random", "object"])
def test_image_keep_rules(rule):
    import train as T
    torch.manual_seed(0)
    mcfg = tiny_model_cfg()
    model = M.TwoTower(mcfg, 3).eval()
    images, ids = tiny_batch(mcfg, B=3)
    x = M.patchify(images, mcfg.vit.patch_size)
    N = x.shape[1]
    objects = torch.zeros(3, N)
    objects[:, :4] = 1.0
    with torch.no_grad():
        _, (ia, _) = model.features(x, M.all_patches(x), ids, aux=True)
    cfg = T.Config(keep_image=0.25, device="cpu")
    noise = E.draw_noise(3, N, ids.shape[1], torch.Generator().manual_seed(0))["image"]   # (C, 3, N)
    idx = E.image_keep(model, x, ids, ia[0], rule, cfg, noise, torch.tensor([0, 1, 2]), objects)
    assert idx.shape == (3, 4) and all(len(set(r.tolist())) == 4 for r in idx)
    assert torch.equal(idx, idx.sort(1).values)
    if rule == "object":
        assert idx.tolist() == [[0, 1, 2, 3]] * 3
    if rule == "paper":
        assert torch.equal(idx, exmask.keep_top(ia[0], 4))
    if rule == "random":
        assert torch.equal(idx, exmask.keep_top(noise[0], 4))
    g = mcfg.vit.grid
    if rule == "attn":   # the top of the 3 x 3 smoothed row; with --smooth-image 1 the raw row's
        assert torch.equal(idx, exmask.keep_top(exmask.smooth_scores(ia[0], g, 3), 4))
        raw = E.image_keep(model, x, ids, ia[0], rule, replace(cfg, smooth_image=1), noise)
        assert torch.equal(raw, exmask.keep_top(ia[0], 4))
    if rule == "spread":   # 4 patches of a 4 x 4 grid: one in each 2 x 2 region
        assert all(sorted({(i // g // 2, i % g // 2) for i in r.tolist()}) == [(0, 0), (0, 1), (1, 0), (1, 1)]
                   for r in idx)
    if rule == "sample":   # drawn in proportion to attention: other noise, other patches
        other = E.draw_noise(3, N, ids.shape[1], torch.Generator().manual_seed(1))["image"]
        assert not torch.equal(idx, E.image_keep(model, x, ids, ia[0], rule, cfg, other))
    if rule in ("class", "feature"):   # the chosen mask scores at least as well as every candidate
        def score(i):
            emb = model.image(M.gather_tokens(x, i), i)
            if rule == "feature":
                return torch.nn.functional.cosine_similarity(emb, model.image(x, M.all_patches(x)), dim=-1)
            return model.classify(emb, model.text(ids)).log_softmax(-1)[torch.arange(3), torch.tensor([0, 1, 2])]
        with torch.no_grad():
            best = score(idx)
            for u in noise:
                assert (best >= score(exmask.keep_top(u, 4)) - 1e-5).all()


def test_mask_candidates_one_is_the_random_mask_and_more_keep_the_image_better(tmp_path):
    """The feature rule with 1 candidate keeps the random-mask ablation's patches; with more, its
    masks are at least as faithful to the full image (the best of a superset of candidates)."""
    import train as T
    cfg = tiny_train_cfg(tmp_path, device="cpu")
    mcfg, state, tok = towers.backbone(cfg, "cpu", T.console(cfg))
    data = T.prepare(T.read_data(cfg, mcfg.vit.image_size), cfg, mcfg, tok)
    model = M.TwoTower(mcfg, 4).eval()
    model.load_state_dict(state, strict=False)
    rows = data["is_train"].nonzero().flatten()[:12]
    N, L = data["patches"].shape[1], data["ids"].shape[1]

    def masks(method, C):
        c = replace(cfg, mask_candidates=C)
        return E.mask_sets(model, data, rows, method, c, E.draw_noise(len(rows), N, L, torch.Generator().manual_seed(0),
                                                                      method, c))["keep_idx"]

    assert torch.equal(masks("exmask", 1), masks("random-mask", 1))
    x = data["patches"][rows].float()
    with torch.no_grad():
        full = model.image(x, M.all_patches(x))
        fid = [torch.nn.functional.cosine_similarity(model.image(M.gather_tokens(x, i), i), full, dim=-1)
               for i in (masks("exmask", 4), masks("exmask", 16))]
    assert (fid[1] >= fid[0] - 1e-5).all() and fid[1].mean() > fid[0].mean()
    with pytest.raises(ValueError, match="mask_candidates"):
        T.Config(mask_candidates=0)


def test_oracle_mask_needs_object_masks():
    import train as T
    mcfg = tiny_model_cfg()
    model = M.TwoTower(mcfg, 1).eval()
    x = torch.zeros(2, mcfg.vit.n_patches, 48)
    with pytest.raises(SystemExit, match="object masks"):
        E.image_keep(model, x, torch.zeros(2, 12, dtype=torch.long), torch.rand(2, 16), "object",
                     T.Config(device="cpu"), torch.rand(8, 2, 16))


def test_every_image_mask_trains_and_oracle_uses_the_synth_objects(tmp_path, monkeypatch):
    import train as T
    cfg = tiny_train_cfg(tmp_path, methods="exmask,oracle-mask,paper-mask", image_mask="class", device="cpu")
    by = {r["method"]: r for r in T.train(cfg)}
    assert by["exmask"]["settings"]["image_mask"] == "class"
    kept = {r["memory"]["mean_kept_patches"] for r in by.values()}   # one share for every rule (fill_keep's)
    assert len(kept) == 1 and kept.pop() >= exmask.keep_count(16, cfg.keep_image)
    # what each method keeps of the same rows: paper-mask the top of the raw attention row, oracle-mask
    # the patches most on the object (the embedded data's sprites), random-mask neither
    mcfg, data, model = tiny_model_and_data(cfg)
    rows = data["is_train"].nonzero().flatten()[:16]
    K = exmask.keep_count(16, cfg.keep_image)

    def kept_by(method):
        noise = E.draw_noise(len(rows), 16, data["ids"].shape[1], torch.Generator().manual_seed(0), method, cfg)
        return E.mask_sets(model, data, rows, method, cfg, noise)["keep_idx"]
    sig = E.signals(model, data, rows, cfg)
    assert torch.equal(kept_by("paper-mask"), exmask.keep_top(sig["img_attn"], K))
    on = lambda idx: float(data["objects"][rows].gather(1, idx).mean())
    assert on(kept_by("oracle-mask")) > on(kept_by("random-mask")) + 0.2
    with pytest.raises(ValueError, match="image_mask"):
        T.Config(image_mask="magic")
    got = []
    monkeypatch.setattr(T, "train", got.append)
    T.main(["--image-mask", "spread", "--val", "0.25"])
    assert got[0].image_mask == "spread" and got[0].val == 0.25
    with pytest.raises(SystemExit):
        T.main(["--image-mask", "magic"])


# ----------------------------------------------------------------------------- the context term (#11)

def text_masks(shared: bool, monkeypatch, weight: float = 10.0) -> tuple[dict, int]:
    """exmask's and no-context's text masks of a tiny model whose towers have one width (24), built
    as one jointly trained pair (shared) or as two unrelated towers; and how often the context term ran."""
    import train as T
    torch.manual_seed(0)
    mcfg = tiny_model_cfg(shared_space=shared)
    model = M.TwoTower(mcfg, 3).eval()
    images, ids = tiny_batch(mcfg, B=3)
    data = {"patches": M.patchify(images, mcfg.vit.patch_size).to(torch.uint8), "ids": ids,
            "labels": torch.tensor([0, 1, 2])}
    cfg = T.Config(keep_text=0.5, image_mask="attn", context_weight=weight, device="cpu")
    calls, real = [], exmask.context_scores
    monkeypatch.setattr(exmask, "context_scores", lambda *a: calls.append(1) or real(*a))
    rows = torch.arange(3)
    N, L = data["patches"].shape[1], ids.shape[1]
    out = {m: E.mask_sets(model, data, rows, m, cfg, E.draw_noise(3, N, L, torch.Generator().manual_seed(0), m, cfg))["keep"]
           for m in ("exmask", "no-context")}
    return out, len(calls)


def test_context_term_is_skipped_between_unrelated_towers_of_equal_width(monkeypatch):
    """Equal widths (ViT-S + MiniLM: 384 and 384) are no shared space: the text mask of unrelated
    towers is the one without the context term."""
    keep, calls = text_masks(False, monkeypatch)
    assert calls == 0 and torch.equal(keep["exmask"], keep["no-context"])


def test_context_term_runs_for_jointly_trained_towers(monkeypatch):
    keep, calls = text_masks(True, monkeypatch)
    assert calls > 0 and not torch.equal(keep["exmask"], keep["no-context"])
    keep, calls = text_masks(True, monkeypatch, weight=0.0)            # context_weight 0: the term weighs nothing
    assert calls > 0 and torch.equal(keep["exmask"], keep["no-context"])


def test_loaded_towers_share_no_space_and_a_shared_space_needs_one_width(tmp_path):
    """towers.backbone: the default pair shares a space; with a real tower in place of one it does
    not. A config that claims a shared space for towers of two widths is refused; a stored config
    from before the field existed claims none."""
    import train as T
    from test_exmask import write_tiny_bert
    write_tiny_bert(str(tmp_path / "bert"))
    default = tiny_train_cfg(tmp_path)
    assert towers.backbone(default, "cpu", T.console(default))[0].shared_space
    bert = replace(default, text_model=str(tmp_path / "bert"))
    mcfg = towers.backbone(bert, "cpu", T.console(bert))[0]
    assert not mcfg.shared_space
    M.TwoTower(mcfg, 2)                                             # widths 32 and 16: fine, no shared space
    with pytest.raises(ValueError, match="one width"):
        M.TwoTower(replace(mcfg, shared_space=True), 2)
    old = {k: v for k, v in dataclasses.asdict(tiny_model_cfg()).items() if k != "shared_space"}
    assert not M.ModelConfig.from_dict(old).shared_space
    assert M.ModelConfig.from_dict(dataclasses.asdict(tiny_model_cfg())).shared_space


# ----------------------------------------------------------------------------- method defects (#8)

def test_single_modality_runs_store_nothing_of_the_other_modality(tmp_path):
    import train as T
    mcfg = tiny_train_cfg(tmp_path).model
    for mod in ("text", "image"):
        res = T.train(tiny_train_cfg(tmp_path, methods="replay,exmask", out=str(tmp_path / mod),
                                     model=replace(mcfg, modalities=mod)))
        rep, ex = res
        if mod == "text":
            assert rep["memory"]["mean_kept_patches"] == 0 and ex["memory"]["mean_kept_patches"] == 0
            assert ex["memory"]["exemplars_per_class"] >= rep["memory"]["exemplars_per_class"]
        else:
            assert rep["memory"]["mean_kept_tokens"] == 0 and ex["memory"]["mean_kept_tokens"] == 0
            assert ex["memory"]["exemplars_per_class"] > 2 * rep["memory"]["exemplars_per_class"]
        both = M.TwoTower(replace(mcfg, modalities="image,text"), 4)
        both.freeze_backbone()
        one = M.TwoTower(replace(mcfg, modalities=mod), 4)
        one.freeze_backbone()
        assert one.trainable_params() < both.trainable_params()
        assert all(not p.requires_grad for n, p in one.named_parameters()
                   if n.startswith("image." if mod == "text" else "text."))


def test_token_mixup_never_puts_two_tokens_at_one_position():
    g = torch.Generator().manual_seed(0)
    B, K, P, N = 32, 6, 3, 16

    def batch(seed):
        gg = torch.Generator().manual_seed(seed)
        idx = torch.stack([torch.randperm(N, generator=gg)[:K].sort().values for _ in range(B)])
        pix = torch.randint(0, 255, (B, K, P), dtype=torch.uint8, generator=gg)
        pos = torch.stack([torch.cat([torch.tensor([0]), 1 + torch.randperm(9, generator=gg)[:5].sort().values,
                                      torch.tensor([10])]) for _ in range(B)])
        ids = torch.randint(4, 50, (B, 7), generator=gg)
        return dict(pixels=pix, patch_idx=idx, ids=ids, pos=pos, labels=torch.arange(B))

    a, b = batch(1), batch(2)
    r = exmask.token_mixup(a, b, torch.rand(B, generator=g), 0, g)
    for i in range(B):
        assert len(set(r["patch_idx"][i].tolist())) == K
        real = r["ids"][i] != 0
        assert len(set(r["pos"][i][real].tolist())) == int(real.sum())
        for k in range(K):   # every patch is a's or b's own patch at that position
            p = int(r["patch_idx"][i, k])
            srcs = [s["pixels"][i][s["patch_idx"][i] == p] for s in (a, b)]
            assert any(len(s) and torch.equal(s[0], r["pixels"][i, k]) for s in srcs)
    assert 0 <= r["lam"].min() and r["lam"].max() <= 1


def test_herding_stops_at_the_quota_with_the_same_memory(tmp_path):
    from memory import Memory
    cfg = tiny_train_cfg(tmp_path, methods="exmask", device="cpu")
    mcfg, data, model = tiny_model_and_data(cfg)
    all_, _ = E.candidates(model, data, [0, 1], "exmask", cfg, torch.Generator().manual_seed(0))
    q = 3 * exmask.nbytes(all_[0][0])
    cut, _ = E.candidates(model, data, [0, 1], "exmask", cfg, torch.Generator().manual_seed(0), quota=q)
    mem = Memory(total_bytes=2 * q)
    mem.add(all_)
    assert [len(v) for v in cut.values()] == [len(v) for v in mem.classes.values()] and len(cut[0]) < len(all_[0])
    for c in cut:
        assert all(torch.equal(x["pixels"], y["pixels"]) for x, y in zip(cut[c], mem.classes[c]))


def test_bench_mask_precision_on_a_manifest_with_masks(tmp_path, monkeypatch):
    import json
    import bench
    import train as T
    root = fake_theme_tree(str(tmp_path / "icons"))
    path = R.build_icons(root, str(tmp_path / "out"), ("alpha", "beta", "gamma"), n_classes=3, per_class=10,
                         min_themes=2, size=32, log=lambda *a: None)
    cfg = tiny_train_cfg(tmp_path)
    tiny = towers.backbone(cfg, "cpu", T.console(cfg))            # tiny towers instead of the default ones
    monkeypatch.setattr(towers, "default_backbone", lambda *a, **k: tiny)
    monkeypatch.setenv("EXMASK_CACHE", str(tmp_path / "cache"))   # the manifest's image cache: not in ~/.cache
    out = str(tmp_path / "bench.json")
    bench.main(["--only", "mask_precision", "--data", path, "--threads", "1", "--out", out])
    res = json.load(open(out))["results"]["mask_precision"]
    assert res["rows"] == 24 and res["kept_patches"] == exmask.keep_count(16, T.Config().keep_image)  # train rows
    assert set(res["rules"]) == {"paper", "attn", "spread", "sample", "feature", "random", "object"}
    r = res["rules"]
    assert r["object"]["on_object"] >= r["random"]["on_object"] and r["object"]["on_object"] > 0
    assert r["feature"]["fidelity"] >= r["random"]["fidelity"] - 1e-6     # its first candidate is random's mask
    bench.main(["--only", "mask_precision", "--data", path, "--threads", "1", "--out", out, "--keep-image", "0.5"])
    assert json.load(open(out))["results"]["mask_precision"]["kept_patches"] == 8                 # half of 16


def test_bench_masked_test_reads_a_trained_run(tmp_path, monkeypatch):
    import json
    import bench
    import train as T
    root = fake_theme_tree(str(tmp_path / "icons"))
    path = R.build_icons(root, str(tmp_path / "out"), ("alpha", "beta", "gamma"), n_classes=3, per_class=10,
                         min_themes=2, size=32, log=lambda *a: None)
    monkeypatch.setenv("EXMASK_CACHE", str(tmp_path / "cache"))
    cfg = tiny_train_cfg(tmp_path, methods="exmask", data=path, keep_image=0.25)
    T.train(cfg)
    tiny = towers.backbone(cfg, "cpu", T.console(cfg))            # the run's towers stand for the default ones
    monkeypatch.setattr(towers, "default_backbone", lambda *a, **k: tiny)
    out = str(tmp_path / "bench.json")
    run = os.path.join(cfg.out, "exmask")
    bench.main(["--only", "masked_test", "--run", run, "--data", path, "--threads", "1", "--out", out])
    res = json.load(open(out))["results"]["masked_test"]
    K0 = exmask.keep_count(16, 0.25)                                # the run's share, not the default's
    assert K0 != exmask.keep_count(16, T.Config().keep_image)
    assert res["test_rows"] == 6 and res["last_phase_classes"] == 2 and [r["kept_patches"] for r in res["rows"]] == [16, K0, 2 * K0]
    for r in res["rows"]:
        assert all(0 <= r[k] <= 100 for k in ("old_class_accuracy", "last_phase_accuracy", "old_rows_put_in_last_phase"))
    # the whole images' accuracy is the run's own after its last phase (1 old class, 2 new; 2 test rows each)
    ran = json.load(open(os.path.join(cfg.out, "results.json")))        # one method, one seed: that run
    whole = res["rows"][0]
    assert abs((2 * whole["old_class_accuracy"] + 4 * whole["last_phase_accuracy"]) / 6 - ran["last_accuracy"]) < 1e-6
    with pytest.raises(SystemExit, match="--run"):
        bench.main(["--only", "masked_test", "--out", out])


def test_a_class_with_too_few_rows_keeps_more_patches_and_fills_its_quota(tmp_path):
    """fill_keep: with rows to spare a class's exemplars keep the --keep-image share; with too few
    rows to fill the quota at that share, every row is stored, each with more patches, within the quota."""
    assert exmask.fill_keep(10, 10 * (6 * 48 + 20), 64, 48, 20, 4) == 6      # exactly what fits
    assert exmask.fill_keep(10, 10 * (3 * 48 + 20), 64, 48, 20, 4) == 4      # never below the share
    assert exmask.fill_keep(2, 10 ** 9, 64, 48, 20, 4) == 64                  # never beyond the image
    assert exmask.fill_keep(10, None, 64, 48, 20, 4) == 4
    cfg = tiny_train_cfg(tmp_path, methods="exmask", device="cpu", keep_image=0.25, fill="patches")
    mcfg, data, model = tiny_model_and_data(cfg)
    N = data["patches"].shape[1]
    rows = int((data["is_train"] & (data["labels"] == 0)).sum())
    K = exmask.keep_count(N, cfg.keep_image)
    for method in ("exmask", "random-mask"):
        small, _ = E.candidates(model, data, [0], method, cfg, torch.Generator().manual_seed(0), quota=3000)
        assert len(small[0]) < rows and {len(ex["pixels"]) for ex in small[0]} == {K}       # rows to spare
        q = rows * (2 * K * data["patches"].shape[2])                                        # room for all, twice the patches
        big, _ = E.candidates(model, data, [0], method, cfg, torch.Generator().manual_seed(0), quota=q)
        kept = {len(ex["pixels"]) for ex in big[0]}
        assert len(big[0]) == rows and len(kept) == 1 and K < kept.pop() <= 2 * K
        assert sum(exmask.nbytes(ex) for ex in big[0]) <= q


def test_fill_copies_stores_more_masked_copies_of_each_row_at_the_share(tmp_path, monkeypatch):
    """--fill copies: a class whose rows all fit with bytes to spare stores each row again, round by
    round in herding order, each copy at the --keep-image share and keeping patches the row's earlier
    copies do not, within the quota; with rows to spare nothing changes; with masked herding too."""
    import train as T
    cfg = tiny_train_cfg(tmp_path, methods="exmask", device="cpu", keep_image=0.25, fill="copies")
    mcfg, data, model = tiny_model_and_data(cfg)
    N, P = data["patches"].shape[1:]
    rows = int((data["is_train"] & (data["labels"] == 0)).sum())
    K = exmask.keep_count(N, cfg.keep_image)
    q = rows * 3 * K * P                                                   # room for every row, about 2.5 times
    for method in ("exmask", "random-mask"):
        small = {f: E.candidates(model, data, [0], method, replace(cfg, fill=f), torch.Generator().manual_seed(0),
                                 quota=3000)[0][0] for f in ("patches", "copies")}
        assert [ex["patch_bits"].tolist() for ex in small["copies"]] == [ex["patch_bits"].tolist() for ex in small["patches"]]
        big, _ = E.candidates(model, data, [0], method, cfg, torch.Generator().manual_seed(0), quota=q)
        assert 2 * rows <= len(big[0]) < 3 * rows and {len(ex["pixels"]) for ex in big[0]} == {K}
        assert sum(exmask.nbytes(ex) for ex in big[0]) <= q
        first, second = big[0][:rows], big[0][rows:2 * rows]                # round 1 and round 2, the same rows
        assert all(torch.equal(a["ids"], b["ids"]) for a, b in zip(first, second))
        assert not any((exmask.unpack_mask(a["patch_bits"]) & exmask.unpack_mask(b["patch_bits"])).any()
                       for a, b in zip(first, second))                        # no patch kept twice
        most, _ = E.candidates(model, data, [0], method, cfg, torch.Generator().manual_seed(0), quota=rows * 40 * K * P)
        assert len(most[0]) == rows * E.MAX_COPIES and min(len(ex["pixels"]) for ex in most[0]) > K   # the most copies
    herded = E.candidates(model, data, [0], "exmask", replace(cfg, herding="masked"), torch.Generator().manual_seed(0),
                          quota=q)[0][0]                                       # masked herding: its own masks first
    assert 2 * rows <= len(herded) < 3 * rows and {len(ex["pixels"]) for ex in herded} == {K}
    assert not any((exmask.unpack_mask(a["patch_bits"]) & exmask.unpack_mask(b["patch_bits"])).any()
                   for a, b in zip(herded[:rows], herded[rows:2 * rows]))
    with pytest.raises(ValueError, match="fill"):
        replace(cfg, fill="more")
    run = T.train(tiny_train_cfg(tmp_path / "run", methods="exmask", device="cpu", keep_image=0.25, fill="copies",
                                 memory_per_class=6, synth=D.SynthConfig(n_classes=4, train_per_class=12,
                                                                         test_per_class=4)))[0]
    assert run["settings"]["fill"] == "copies" and run["memory"]["exemplars_per_class"] > 12   # more than its rows
    assert run["memory"]["bytes_used"] <= run["memory"]["budget_bytes"]
    seen = {}
    monkeypatch.setattr(T, "train", lambda c: seen.setdefault("cfg", c))
    T.main(["--fill", "copies", "--out", str(tmp_path / "o")])
    assert seen["cfg"].fill == "copies" and T.Config().fill == "patches"


def _ragged_items():
    """Two exemplars of class 0 that keep 3 patches and one of class 1 that keeps 6 (the fill rule),
    each with a caption: a memory whose rows keep different numbers of patches."""
    g = torch.Generator().manual_seed(0)
    items = []
    for c, k in ((0, 3), (0, 3), (1, 6)):
        ids = torch.nn.functional.pad(torch.tensor([2, 5, 6, 3]), (0, 8))
        items.append(exmask.encode(torch.randint(0, 255, (16, 48), generator=g).to(torch.uint8), ids, c, 50, 0,
                                   idx=torch.randperm(16, generator=g)[:k].sort().values))
    return items


def test_a_memory_whose_rows_keep_different_numbers_of_patches_replays_each_as_stored():
    """collate pads rows that keep fewer patches and masks the padding out: each row's logits equal
    those of the row replayed alone (this crashed before: the fill rule gives classes different shares)."""
    cfg = tiny_model_cfg()
    torch.manual_seed(0)
    model = M.TwoTower(cfg, 2).eval()
    items = _ragged_items()
    b = exmask.collate(items, 0)
    assert b["pixels"].shape[1] == 6 and b["patch_keep"].sum(1).tolist() == [3, 3, 6]
    for i in range(3):   # the padding sits at positions the row did not keep
        real = b["patch_idx"][i][b["patch_keep"][i]]
        assert torch.equal(real, exmask.unpack_bits(items[i]["patch_bits"]))
        assert len(set(b["patch_idx"][i].tolist())) == 6
    got = model.forward_tokens(b["pixels"], b["patch_idx"], b["ids"], b["pos"], b["patch_keep"])
    for i, ex in enumerate(items):
        one = exmask.collate([ex], 0)
        assert "patch_keep" not in one
        torch.testing.assert_close(got[i], model.forward_tokens(one["pixels"], one["patch_idx"], one["ids"], one["pos"])[0])
    # SigLIP-style attention pooling masks the padding too
    mp = M.TwoTower(tiny_model_cfg(vit=replace(cfg.vit, pool="map")), 2).eval()
    got = mp.forward_tokens(b["pixels"], b["patch_idx"], b["ids"], b["pos"], b["patch_keep"])
    one = exmask.collate([items[0]], 0)
    torch.testing.assert_close(got[0], mp.forward_tokens(one["pixels"], one["patch_idx"], one["ids"], one["pos"])[0])
    # token mixup takes only real patches, never two at one position
    r = exmask.token_mixup(b, exmask.take(b, torch.tensor([2, 2, 0]), 0), torch.tensor([1.0, 0.5, 0.0]), 0,
                           torch.Generator().manual_seed(0))
    for i in range(3):
        kept = r["patch_idx"][i][r["patch_keep"][i]].tolist()
        assert len(kept) == len(set(kept))
    assert sorted(r["patch_idx"][0][r["patch_keep"][0]].tolist()) == b["patch_idx"][0][:3].tolist()   # lam 1: a's own
    # lam 0: all 3 of b's, and a (which keeps 6) fills the rest from its own: half and half
    assert set(b["patch_idx"][0][:3].tolist()) <= set(r["patch_idx"][2][r["patch_keep"][2]].tolist())
    assert r["patch_keep"][2].sum() == 6 and r["lam"][2] == 0.5


def test_lowres_thumbnail_fills_the_dropped_patches_and_the_kept_ones_stay_sharp():
    """exmask.thumbnail / fill_lowres: a flat image comes back exactly; kept patches are the original
    pixels; the thumbnail's bytes are counted (exemplar_bytes) and a whole exemplar replays every patch."""
    p, N = 4, 16                                                   # a 16 px image, 4 x 4 patches of 4 px
    flat = torch.full((1, N, 3 * p * p), 77, dtype=torch.uint8)
    th = exmask.thumbnail(flat, p, 4)
    assert th.shape == (1, 3, 4, 4) and bool((th == 77).all())
    assert torch.equal(exmask.fill_lowres(th, flat[:, :0], torch.zeros(1, 0, dtype=torch.long), p, N), flat)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, N, 3 * p * p), generator=g).to(torch.uint8)
    idx = torch.tensor([[0, 5, 9], [1, 2, 15]])
    full = exmask.fill_lowres(exmask.thumbnail(x, p, 2), M.gather_tokens(x, idx), idx, p, N)
    assert full.shape == x.shape and torch.equal(M.gather_tokens(full, idx), M.gather_tokens(x, idx))
    # the dropped patches are a blur of the image: closer to it than to another image
    other = torch.roll(x, 1, 0)
    assert (full.float() - x.float()).abs().mean() < (full.float() - other.float()).abs().mean()
    with pytest.raises(ValueError, match="divide"):
        exmask.thumbnail(x, p, 3)
    ids = torch.nn.functional.pad(torch.tensor([2, 5, 3]), (0, 5))
    ex = exmask.encode(x[0], ids, 1, 50, 0, idx=idx[0], thumb=exmask.thumbnail(x[:1], p, 2)[0])
    assert exmask.nbytes(ex) == exmask.exemplar_bytes(N, 3 * p * p, 3, 50, 8, 3 / N, lowres=2)
    b = exmask.collate([ex], 0, n_patches=N)
    assert b["patch_idx"].tolist() == [list(range(N))] and torch.equal(b["pixels"][0], full[0])
    v = exmask.masked_view(x[:1], ids[None], idx[:1], None, 0, p, 2)     # the same sample, not stored
    assert torch.equal(v["pixels"], b["pixels"]) and torch.equal(v["patch_idx"], b["patch_idx"])
    with pytest.raises(ValueError, match="n_patches"):
        exmask.collate([ex], 0)


def test_lowres_runs_stay_in_budget_and_store_thumbnails(tmp_path):
    """--lowres end to end: exmask and random-mask exemplars carry a thumbnail, fill their quota
    within it, and replay; the option is recorded with the run."""
    import train as T
    cfg = tiny_train_cfg(tmp_path, methods="exmask,random-mask", device="cpu", lowres=4, memory_per_class=3,
                         synth=D.SynthConfig(n_classes=4, train_per_class=12, test_per_class=4))
    res = T.train(cfg)
    for r in res:
        assert r["settings"]["lowres"] == 4 and r["memory"]["bytes_used"] <= r["memory"]["budget_bytes"]
    ck = torch.load(os.path.join(cfg.out, "exmask", "checkpoint.pt"), weights_only=True)
    from memory import Memory
    items = Memory.from_state_dict(ck["memory"]).items()
    assert items and all(ex["thumb"].shape == (3, 8, 8) for ex in items)          # 32 px at 1/4
    with pytest.raises(SystemExit, match="lowres"):                                # resume refuses other settings
        T.train(replace(cfg, lowres=2, resume=True, methods="exmask"))


def test_masked_herding_keeps_the_same_masks_in_another_order(tmp_path):
    """--herding masked: every row keeps the mask it would keep anyway (noise drawn up front), only
    the order (which rows fill the quota) changes; herding toward a target picks first the row that
    lies closest to the target's mean."""
    from memory import herd
    cfg = tiny_train_cfg(tmp_path, methods="exmask", device="cpu")
    mcfg, data, model = tiny_model_and_data(cfg)
    full, _ = E.candidates(model, data, [0], "exmask", cfg, torch.Generator().manual_seed(0))
    mcfg_ = replace(cfg, herding="masked")
    mine, _ = E.candidates(model, data, [0], "exmask", mcfg_, torch.Generator().manual_seed(0))
    key = lambda ex: (ex["pixels"].sum().item(), tuple(ex["patch_bits"].tolist()))
    assert sorted(map(key, full[0])) == sorted(map(key, mine[0]))        # the same exemplars, all kept
    assert list(map(key, full[0])) != list(map(key, mine[0]))            # in another order
    # herd with a target: the first pick is the row whose own feature lies closest to the target mean
    f = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    t = torch.randn(6, 4)
    mu = torch.nn.functional.normalize(t, dim=1).mean(0)
    assert next(herd(f, target=t)) == int(((f - mu) ** 2).sum(1).argmin())
    with pytest.raises(ValueError, match="herding"):
        replace(cfg, herding="sometimes")


def test_a_total_byte_budget_fills_every_class_for_the_last_phase_share(tmp_path):
    """--memory-bytes: each class's share shrinks as classes come, so the fill rule sizes every class's
    exemplars for the share of the last phase. The first phase's class then keeps as many rows of as
    many patches as the last one's (before, it kept sharper exemplars while its share was large and
    later lost whole rows to the trimming)."""
    import train as T
    cfg = tiny_train_cfg(tmp_path, methods="exmask", device="cpu", memory_bytes=20000, memory_per_class=0, phases=4)
    r = T.train(cfg)[0]
    assert len({s["mean_kept_patches"] for s in r["memory_per_phase"]}) == 1
    counts = torch.load(os.path.join(cfg.out, "exmask", "checkpoint.pt"), weights_only=True)["memory"]["counts"]
    assert counts == [counts[0]] * 4 and counts[0] > 1
    assert r["memory"]["bytes_used"] <= 20000 and len(r["accuracy_matrix"]) == 4
    assert T.Memory(total_bytes=20000).quota(4) == 5000 and T.Memory(unlimited=True).quota(4) is None   # keep all


def test_a_checkpoint_from_before_a_setting_existed_resumes_at_its_default(tmp_path):
    """load_checkpoint: a setting the checkpoint does not name (written before it existed) counts as its
    default, so such a run resumes; any other value is refused, by name."""
    import checkpoints as C
    import train as T
    run = {"method": "exmask", "seed": 0, "lowres": 0, "herding": "full"}
    old = {k: v for k, v in run.items() if k not in ("lowres", "herding")}
    path = str(tmp_path / "checkpoint.pt")
    C.save_checkpoint(path, {"run": old})
    defaults = {k: getattr(T.Config(), k) for k in C.RUN_KEYS}
    assert C.load_checkpoint(path, run, defaults)["run"] == old
    with pytest.raises(SystemExit, match="lowres"):
        C.load_checkpoint(path, dict(run, lowres=2), defaults)
    # logit adjustment did not exist before it was recorded: such a checkpoint trained without it,
    # whatever today's default says
    assert C.load_checkpoint(path, dict(run, logit_adjust=0.0), defaults)["run"] == old
    with pytest.raises(SystemExit, match="logit_adjust"):
        C.load_checkpoint(path, dict(run, logit_adjust=T.Config().logit_adjust), defaults)
    # nor did the head's training after each phase (--balanced-head, on by default since)
    assert C.load_checkpoint(path, dict(run, balanced_head=0), defaults)["run"] == old
    with pytest.raises(SystemExit, match="balanced_head"):
        C.load_checkpoint(path, dict(run, balanced_head=T.Config().balanced_head), defaults)


def test_ablations_count_their_own_bytes_and_the_candidate_rules_stay_within_mask_batch(tmp_path, monkeypatch):
    """candidates plans bytes by what a method masks: text-mask keeps the image whole (no fill, no copies,
    no thumbnails), image-mask keeps the caption whole even with --keep-text below 1 (so a quota sized
    for every row stores every row). The "class" and "feature" rules score one candidate of every row
    per forward pass (at most MASK_BATCH rows), and "class" runs on an image-only model."""
    import train as T
    cfg = tiny_train_cfg(tmp_path, methods="exmask", device="cpu", keep_image=0.25, fill="copies", lowres=2)
    mcfg, data, model = tiny_model_and_data(cfg)
    N, P = data["patches"].shape[1:]
    rows = int((data["is_train"] & (data["labels"] == 0)).sum())
    full = exmask.full_bytes(N, P, mcfg.text.context, mcfg.text.vocab_size)
    got = E.candidates(model, data, [0], "text-mask", replace(cfg, keep_text=0.8), torch.Generator().manual_seed(0),
                       quota=3 * rows * full)[0][0]
    assert len(got) == rows and all("thumb" not in ex and len(ex["pixels"]) == N for ex in got)   # once each, whole
    caps = data["ids"][(data["is_train"] & (data["labels"] == 0)).nonzero().flatten()]
    longest = int((caps != mcfg.text.pad_id).sum(1).max())
    one = exmask.exemplar_bytes(N, P, longest, mcfg.text.vocab_size, mcfg.text.context, 0.25, None)  # caption whole
    got = E.candidates(model, data, [0], "image-mask", replace(cfg, keep_text=0.5, fill="patches", lowres=0),
                       torch.Generator().manual_seed(0), quota=rows * one)[0][0]
    assert len(got) == rows and all(len(ex["ids"]) == int((c != mcfg.text.pad_id).sum()) for ex, c in zip(got, caps))

    passes, real = [], model.image.forward
    monkeypatch.setattr(model.image, "forward", lambda x, *a, **k: (passes.append(len(x)), real(x, *a, **k))[1])
    monkeypatch.setattr(E, "MASK_BATCH", 4)
    for rule in ("feature", "class"):
        passes.clear()
        E.candidates(model, data, [0], "exmask", replace(cfg, image_mask=rule, fill="patches", lowres=0),
                     torch.Generator().manual_seed(0))
        assert passes and max(passes) <= 4
    image_only = replace(cfg, model=replace(mcfg, modalities="image"), methods="exmask", image_mask="class",
                         fill="patches", lowres=0, out=str(tmp_path / "img"))
    r = T.train(image_only)[0]
    assert r["modalities"] == "image" and r["memory"]["exemplars"] > 0
