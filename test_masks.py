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
from test_exmask import tiny_batch, tiny_model_and_data, tiny_model_cfg, tiny_train_cfg

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


def test_icon_files_rank_vectors_as_96_px_and_fall_back_to_bitmaps_without_rsvg(tmp_path):
    """recipes._icon_files: a vector file ranks as a 96 px bitmap (it beats 48 px, loses to 128 px);
    without rsvg-convert (vector=False) the theme's best bitmap is kept instead of losing the icon."""
    from PIL import Image
    t = tmp_path / "theme"
    for sub, name in (("48x48/devices", "printer.png"), ("scalable/devices", "printer.svg"),
                      ("48x48/places", "folder.png"), ("128x128/places", "folder.png"), ("scalable/places", "folder.svg"),
                      ("scalable/apps", "calc.svg")):
        os.makedirs(t / sub, exist_ok=True)
        if name.endswith(".png"):
            Image.new("RGBA", (8, 8)).save(t / sub / name)
        else:
            (t / sub / name).write_text("<svg xmlns='http://www.w3.org/2000/svg' width='8' height='8'/>")
    got = R._icon_files(str(t))
    assert got["printer"][0].endswith(os.path.join("scalable", "devices", "printer.svg"))
    assert got["folder"][0].endswith(os.path.join("128x128", "places", "folder.png")) and "calc" in got
    bitmaps = R._icon_files(str(t), vector=False)
    assert bitmaps["printer"][0].endswith(os.path.join("48x48", "devices", "printer.png")) and "calc" not in bitmaps
    assert bitmaps["folder"] == got["folder"]


def test_a_damaged_icon_is_one_error_line(tmp_path):
    root = fake_theme_tree(str(tmp_path / "icons"))
    bad = os.path.join(root, "alpha", "48x48", "devices", "printer.png")
    with open(bad, "r+b") as f:
        f.truncate(60)
    with pytest.raises(SystemExit, match=r"^error: cannot draw the icon .*printer.png.*--themes\)$"):
        R.build_icons(root, str(tmp_path / "out"), ("alpha", "beta", "gamma"), n_classes=3, per_class=10,
                      min_themes=2, size=32, log=lambda *a: None)


def test_icons_split_by_drawing_holds_out_whole_themes(tmp_path, monkeypatch):
    """--split drawing: no test image shows a drawing (a theme's file for its class) that a training
    image shows; the default split by image is as it was (seeded, 20 % of each class's images)."""
    root = fake_theme_tree(str(tmp_path / "icons"))
    drawn = []
    real = R._load_icon
    monkeypatch.setattr(R, "_load_icon", lambda path, side: (drawn.append(path), real(path, side))[1])
    kw = dict(n_classes=3, per_class=12, min_themes=3, size=32, log=lambda *a: None)
    rows = list(csv.DictReader(open(R.build_icons(root, str(tmp_path / "d"), ("alpha", "beta", "gamma"),
                                                  split="drawing", **kw))))
    train = {(r["label"], f) for r, f in zip(rows, drawn) if r["split"] == "train"}
    test = {(r["label"], f) for r, f in zip(rows, drawn) if r["split"] == "test"}
    assert test and train and not test & train
    for c in {r["label"] for r in rows}:                      # one of a class's 3 themes held out: 4 of 12 images
        assert sum(r["split"] == "test" for r in rows if r["label"] == c) == 4
    drawn.clear()
    by_image = list(csv.DictReader(open(R.build_icons(root, str(tmp_path / "i"), ("alpha", "beta", "gamma"), **kw))))
    assert sum(r["split"] == "test" for r in by_image) == 3 * round(12 * 0.2)
    assert {(r["label"], f) for r, f in zip(by_image, drawn) if r["split"] == "test"} & \
        {(r["label"], f) for r, f in zip(by_image, drawn) if r["split"] == "train"}
    with pytest.raises(SystemExit, match="by image or by drawing"):
        R.build_icons(root, str(tmp_path / "x"), ("alpha",), split="theme", **kw)


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


