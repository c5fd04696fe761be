"""Tests of what the memory stores of a class (exemplars.candidates, memory.py, exmask's storage): the
quota cut during herding, more patches or more masked copies where every row fits (--fill), rows that
keep different numbers of patches replayed as stored, low-resolution thumbnails (--lowres), masked
herding, a fixed total budget, and each ablation's own byte count. CPU only, tiny seeded configs.
Run: python -m pytest -q test_memory.py"""
import os
from dataclasses import replace

import pytest
import torch

import data as D
import exmask
import exemplars as E
import models as M
from test_exmask import tiny_model_and_data, tiny_model_cfg, tiny_train_cfg

torch.set_num_threads(2)


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
