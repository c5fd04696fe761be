"""Tests of the phase loop at scale (issue #9): the memory collated once a phase and stepped through
by index, masks in bounded batches that do not change them, the bounded replay batch, joint without
a memory. CPU only, tiny seeded configs. Run: python -m pytest -q test_loop.py"""
import math
import os

import pytest
import torch

import data as D
import exmask
import models as M
import towers
from test_exmask import tiny_train_cfg

torch.set_num_threads(2)


def stored_items(seed: int = 0, masked: bool = True) -> list[dict]:
    """Exemplars as Memory stores them: 5 of 16 patches (or all), captions of 3 to 9 tokens."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(9):
        L = int(torch.randint(3, 10, (), generator=g))
        ids = torch.nn.functional.pad(torch.randint(4, 40, (L,), generator=g), (0, 12 - L))
        keep = torch.rand(12, generator=g) < 0.7
        keep[0] = True
        items.append(exmask.encode(torch.randint(0, 255, (16, 12), generator=g).to(torch.uint8), ids, i % 3, 50, 0,
                                   torch.randperm(16, generator=g)[:5] if masked else None, keep if masked else None))
    return items


@pytest.mark.parametrize("masked", [True, False])
def test_take_from_the_collated_memory_is_collate_of_those_rows(masked):
    items = stored_items(masked=masked)
    bank = exmask.collate(items, 0)
    for rows in ([4, 0, 7], [2], list(range(9)), [5, 5, 1]):
        got, want = exmask.take(bank, torch.tensor(rows), 0), exmask.collate([items[r] for r in rows], 0)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), rows


def test_collate_matches_each_exemplars_own_positions():
    items = stored_items()
    b = exmask.collate(items, 0)
    for i, ex in enumerate(items):
        assert b["patch_idx"][i].tolist() == exmask.unpack_bits(ex["patch_bits"]).tolist()
        n = len(ex["ids"])
        assert b["ids"][i, :n].tolist() == ex["ids"].tolist() and (b["ids"][i, n:] == 0).all()
        assert b["pos"][i, :n].tolist() == exmask.unpack_bits(ex["pos_bits"]).tolist()


def test_masked_new_samples_batch_like_stored_exemplars():
    """train.masked_batch (new samples shown masked, vectorised) equals encode + collate of them."""
    import train as T
    g = torch.Generator().manual_seed(0)
    n, N, P, L = 6, 16, 12, 10
    data = {"patches": torch.randint(0, 255, (n, N, P), generator=g).to(torch.uint8),
            "ids": torch.nn.functional.pad(torch.randint(4, 40, (n, 7), generator=g), (0, L - 7)),
            "labels": torch.arange(n)}
    m = {"keep_idx": torch.stack([torch.randperm(N, generator=g)[:4].sort().values for _ in range(n)]),
         "keep": torch.rand(n, L, generator=g) < 0.5}
    rows, sel = torch.tensor([3, 1, 4]), torch.tensor([3, 1, 4])
    got = T.masked_batch(data, rows, m, sel, 0, "cpu")
    want = exmask.collate([exmask.encode(data["patches"][r], data["ids"][r], int(r), 50, 0, m["keep_idx"][r], m["keep"][r])
                           for r in rows], 0)
    assert all(torch.equal(got[k].long(), want[k].long()) for k in want)


def test_epoch_plan_bounds_the_replay_batch():
    from train import REPLAY_MAX, epoch_plan
    assert epoch_plan(400, 2000, 32) == (13, 32, math.ceil(2000 / 13))           # within the bound: as before
    steps, B, per = epoch_plan(400, 40 * REPLAY_MAX, 32)
    assert per <= REPLAY_MAX and steps * per >= 40 * REPLAY_MAX and steps * B >= 400 and B < 32
    steps, B, per = epoch_plan(5, 10 * REPLAY_MAX, 32)                           # more memory than new data
    assert per <= REPLAY_MAX and steps == 10 and B == 1                          # replay-only steps at the end


def test_replay_batch_is_bounded_by_more_steps(tmp_path, monkeypatch):
    """With REPLAY_MAX below the memory per step, every step replays at most REPLAY_MAX exemplars
    and each exemplar still once per epoch, over more steps."""
    import train as T
    monkeypatch.setattr(T, "REPLAY_MAX", 1)
    calls, real_replay = [], T.replay_batch

    def spy(bank, rows, *a, **k):
        calls.append((len(bank["counts"]), rows.tolist()))
        return real_replay(bank, rows, *a, **k)

    monkeypatch.setattr(T, "replay_batch", spy)
    T.train(tiny_train_cfg(tmp_path, methods="replay", epochs=2, batch_size=8))
    n_mem = calls[0][0]                                   # phase 2: 2 epochs of 16 new samples, 2 steps of 8
    steps = n_mem
    assert steps > 2 and len(calls) == 2 * steps and all(len(r) == 1 for _, r in calls)
    for epoch in (calls[:steps], calls[steps:]):
        rows = [i for _, r in epoch for i in r]
        assert sorted(rows) == list(range(n_mem))


def test_replay_passes_replay_every_exemplar_that_many_times_an_epoch(tmp_path, monkeypatch):
    """--replay-passes 2: each epoch replays every exemplar twice, and the logit prior counts each
    exemplar twice as well; batch replay refuses it."""
    import train as T
    calls, priors = [], []
    real_replay, real_prior = T.replay_batch, T.logit_prior

    def spy(bank, rows, *a, **k):
        calls.append((len(bank["counts"]), rows.tolist()))
        return real_replay(bank, rows, *a, **k)

    def prior(counts, tau):
        priors.append(counts.clone())
        return real_prior(counts, tau)

    monkeypatch.setattr(T, "replay_batch", spy)
    monkeypatch.setattr(T, "logit_prior", prior)
    T.train(tiny_train_cfg(tmp_path, methods="exmask", epochs=1, batch_size=8, replay_passes=2))
    n_mem = calls[0][0]                                   # phase 2, its one epoch
    rows = sorted(i for _, r in calls for i in r)
    assert rows == sorted(list(range(n_mem)) * 2)
    assert priors[-1].sum() == 16 + 2 * n_mem            # the masked views' prior: the 16 new rows' views, once
                                                          # each, and every exemplar twice
    with pytest.raises(ValueError, match="replay_passes"):
        T.Config(replay="batch", replay_passes=2)
    with pytest.raises(SystemExit):
        T.main(["--replay-passes", "0", "--out", str(tmp_path / "x")])


def test_balanced_head_trains_the_head_alone_on_the_memory(tmp_path, monkeypatch):
    """--balanced-head E: after a phase's exemplars are stored, the head alone trains E epochs on the
    memory: it fits the stored exemplars better, and nothing else moves; the loop calls it once a
    phase, and a negative count is refused."""
    import exemplars as E
    import replay
    import train as T
    from memory import Memory
    cfg = tiny_train_cfg(tmp_path, methods="exmask", device="cpu")
    mcfg, state, tok = towers.backbone(cfg, "cpu", T.console(cfg))
    data = T.prepare(T.read_data(cfg, mcfg.vit.image_size), cfg, mcfg, tok)
    model = M.TwoTower(mcfg, 4)
    model.load_state_dict(state, strict=False)
    model.freeze_backbone()
    memory = Memory(unlimited=True)
    memory.add(E.candidates(model, data, [0, 1, 2, 3], "exmask", cfg, torch.Generator().manual_seed(0))[0])
    b = T.memory_bank(memory, mcfg.text.pad_id, "cpu", mcfg.vit.n_patches)["batch"]

    def memory_loss():
        with torch.no_grad():
            logits = model.forward_tokens(b["pixels"], b["patch_idx"], b["ids"], b["pos"], b.get("patch_keep"))
        return float(torch.nn.functional.cross_entropy(logits, b["labels"]))
    before, loss0 = {k: v.detach().clone() for k, v in model.named_parameters()}, memory_loss()
    replay.balanced_head(model, memory, 3, "cpu", 0)
    moved = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert moved == {"head.weight", "head.bias"} and memory_loss() < loss0

    calls = []
    monkeypatch.setattr(T, "balanced_head", lambda m, mem, epochs, *a: calls.append((epochs, len(mem))))
    T.train(tiny_train_cfg(tmp_path, methods="exmask", epochs=1, balanced_head=2))
    assert [e for e, _ in calls] == [2, 2] and 0 < calls[0][1] < calls[1][1]   # each phase, the memory grown
    with pytest.raises(ValueError, match="balanced_head"):
        T.Config(balanced_head=-1)
    with pytest.raises(SystemExit):
        T.main(["--balanced-head", "-1", "--out", str(tmp_path / "x")])


def test_masks_do_not_depend_on_the_batches_they_are_scored_in(tmp_path, monkeypatch):
    """Masks and memory are the same whether a class is scored in one pass or 2 rows at a time, and
    with a quota only the samples herding reaches are masked."""
    import exemplars as E
    import train as T
    cfg = tiny_train_cfg(tmp_path, methods="exmask", device="cpu", keep_text=0.6)
    mcfg, state, tok = towers.backbone(cfg, "cpu", T.console(cfg))
    data = T.prepare(T.read_data(cfg, mcfg.vit.image_size), cfg, mcfg, tok)
    model = M.TwoTower(mcfg, 4)
    model.load_state_dict(state, strict=False)
    for method in ("exmask", "random-mask"):
        whole, _ = E.candidates(model, data, [0, 1], method, cfg, torch.Generator().manual_seed(0))
        masked_rows, real = [], E.mask_sets

        def spy(model, data, rows, *a, **k):
            masked_rows.append(len(rows))
            return real(model, data, rows, *a, **k)

        monkeypatch.setattr(E, "MASK_BATCH", 2)
        monkeypatch.setattr(E, "mask_sets", spy)
        q = 3 * exmask.nbytes(whole[0][0])
        parts, _ = E.candidates(model, data, [0, 1], method, cfg, torch.Generator().manual_seed(0), quota=q)
        monkeypatch.undo()
        assert max(masked_rows) <= 2 and sum(masked_rows) < len(whole[0]) + len(whole[1])
        for c in parts:
            assert 0 < len(parts[c]) < len(whole[c])
            for x, y in zip(parts[c], whole[c]):
                assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x), method


def test_the_memory_is_collated_once_a_phase(tmp_path, monkeypatch):
    """No per-sample Python per step: stored exemplars are collated once a phase, never per step."""
    import train as T
    calls, real = [], exmask.collate
    monkeypatch.setattr(exmask, "collate", lambda items, *a, **k: calls.append(len(items)) or real(items, *a, **k))
    T.train(tiny_train_cfg(tmp_path, methods="exmask", phases=3, epochs=2, token_mixup=0.5, recombine=0.5,
                           synth=D.SynthConfig(n_classes=6, train_per_class=8, test_per_class=4)))
    # the training of phases 2 and 3 once each, and the head's training (--balanced-head) after each
    # phase's exemplars are stored, once each: never per step
    n = calls[0]
    assert n > 0 and calls == [n, n, 2 * n, 2 * n, 3 * n]


def test_joint_keeps_no_memory(tmp_path):
    import train as T
    cfg = tiny_train_cfg(tmp_path, methods="joint")
    r = T.train(cfg)[0]
    ck = torch.load(os.path.join(cfg.out, "joint", "checkpoint.pt"), weights_only=True)
    assert ck["memory"] == {}
    assert r["memory"]["exemplars"] == cfg.synth.n_classes * cfg.synth.train_per_class and r["memory"]["bytes_used"] == 0


@pytest.mark.parametrize("modalities", ["text", "image"])
def test_mixup_replay_and_masked_new_samples_with_one_modality(tmp_path, modalities):
    """Token mixup, recombination and masked new samples also run where one tower is unused."""
    import train as T
    from dataclasses import replace
    cfg = tiny_train_cfg(tmp_path, methods="exmask", token_mixup=1.0, recombine=1.0, mask_new=0.5, keep_text=0.6)
    r = T.train(replace(cfg, model=replace(cfg.model, modalities=modalities)))[0]
    assert r["memory"]["exemplars"] > 0 and len(r["accuracy_matrix"]) == cfg.phases


def test_vectorised_token_mixup_shares_text_by_lambda():
    """Text: a's first and last tokens stay; lam 1 keeps a's content, lam 0 takes b's wherever
    a's specials leave the position free; no position twice."""
    g = torch.Generator().manual_seed(0)
    B, L = 16, 9
    ids_a = torch.randint(4, 40, (B, L), generator=g)
    ids_b = torch.randint(40, 80, (B, L), generator=g)
    pos = torch.arange(L).expand(B, L)
    none = dict(pixels=torch.zeros(B, 0, 1, dtype=torch.uint8), patch_idx=torch.zeros(B, 0, dtype=torch.long))
    a = dict(none, ids=ids_a, pos=pos, labels=torch.zeros(B, dtype=torch.long))
    b = dict(none, ids=ids_b, pos=pos, labels=torch.ones(B, dtype=torch.long))
    r = exmask.token_mixup(a, b, torch.ones(B), 0, g)
    assert torch.equal(r["ids"], ids_a) and torch.equal(r["pos"], pos)
    r = exmask.token_mixup(a, b, torch.zeros(B), 0, g)
    assert (r["ids"][:, 0] == ids_a[:, 0]).all() and (r["ids"][:, -1] == ids_a[:, -1]).all()
    assert sorted(r["pos"][0].tolist()) == list(range(L)) and (r["ids"][:, 1:-1] >= 40).all()
    r = exmask.token_mixup(a, b, torch.full((B,), 0.5), 0, g)
    for i in range(B):
        real = r["ids"][i] != 0
        assert len(set(r["pos"][i][real].tolist())) == int(real.sum()) == L
        assert int((r["ids"][i] < 40).sum()) - 2 == round(0.5 * (L - 2))


def test_bench_phase_loop_times_the_loop_and_its_steps(tmp_path, monkeypatch):
    """bench.py phase_loop with a timm ViT in place of the image tower (cuda's ViT-B/16 path; a ViT-Ti
    at 64 px here), on a tiny config, with every exemplar replayed twice an epoch (--replay-passes 2)."""
    import timm
    import bench
    from dataclasses import replace
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: real(name, **kw, img_size=64))
    base = replace(tiny_train_cfg(tmp_path), epochs=1)
    base = replace(base, model=replace(base.model, text=replace(base.model.text, context=40)))   # room after the captions
    res = bench.phase_loop(bench.Opts(steps=1, vit="vit_tiny_patch16_224", replay_passes=2), base)
    assert res["vit"]["image_size"] == 64 and len(res["phases"]) == base.phases == len(res["phase_seconds"])
    assert res["phases"][1]["replayed_per_step"] > 0 and 0 < res["steps_alone_s"] and res["replay_passes"] == 2
    # the steps alone replay the memory twice an epoch, as the loop did
    import train as T
    p2 = res["phases"][1]
    per_epoch, B, R = T.epoch_plan(base.synth.train_per_class * base.synth.n_classes // base.phases, 2 * p2["exemplars"],
                                   base.batch_size)
    assert p2["exemplars"] > 0 and (p2["steps"], p2["new_per_step"], p2["replayed_per_step"]) == (per_epoch, B, R)
    assert R > T.epoch_plan(B * per_epoch, p2["exemplars"], base.batch_size)[2]
    assert 0 < res["train_phase_s"] + res["candidates_s"] + res["evaluate_s"] + res["balanced_head_s"] <= res["phase_loop_s"]
    assert base.balanced_head and res["balanced_head_s"] > 0                  # the head step, timed apart
    # the steps alone include the new rows' masked views (--mask-new 1, the default) once there is a
    # memory, and the masks of those views are timed apart, within training
    assert base.mask_new == 1 and res["phases"][0]["new_masked_per_step"] == 0
    assert res["phases"][1]["new_masked_per_step"] == res["phases"][1]["new_per_step"] > 0
    assert 0 < res["mask_sets_s"] < res["train_phase_s"]
    # the steps alone replay exemplars at the patches the loop's memory kept (the fill gives them more
    # than --keep-image here: every row fits), the views at --keep-image, captions cut as the loop cuts them
    kept = res["memory_mean_kept_patches"]
    assert p2["replayed_patches"] == round(kept[0]) > p2["masked_patches"]
    assert all(p["caption_columns"] < base.model.text.context for p in res["phases"])


def test_the_loop_runs_sdpa_without_cudnn_on_a_gpu(tmp_path, monkeypatch):
    """models.loop_attention: on cuda, SDPA may use every kernel of LOOP_SDPA and not cuDNN's, which
    builds a plan for each new shape; restored after; nothing changes on the CPU or with None. The
    phase loop trains, chooses exemplars and evaluates inside it, every phase."""
    import train as T
    before = torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()
    with M.loop_attention("cuda"):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == before
    with M.loop_attention("cpu"):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before[0]
    monkeypatch.setattr(M, "LOOP_SDPA", None)
    with M.loop_attention("cuda"):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before[0]
    monkeypatch.undo()
    entered, calls = [], []
    real = M.loop_attention

    class Seen:
        def __init__(self, device):
            self.ctx = real(device)

        def __enter__(self):
            entered.append(True)
            return self.ctx.__enter__()

        def __exit__(self, *exc):
            entered.pop()
            return self.ctx.__exit__(*exc)
    monkeypatch.setattr(M, "loop_attention", Seen)
    for name in ("train_phase", "candidates", "evaluate"):
        fn = getattr(T, name)
        monkeypatch.setattr(T, name, lambda *a, _fn=fn, _n=name, **k: (calls.append((_n, bool(entered))), _fn(*a, **k))[1])
    cfg = tiny_train_cfg(tmp_path, phases=2)
    T.train(cfg)
    assert {n for n, _ in calls} == {"train_phase", "candidates", "evaluate"} and all(inside for _, inside in calls)


def test_bench_sdpa_shapes_times_new_and_repeated_shapes_both_ways():
    """bench.py sdpa_shapes: a step of one shape, of new shapes and of those again, with PyTorch's
    SDPA kernels and under loop_attention (the same on the CPU: one kernel)."""
    import bench
    res = bench.sdpa_shapes(bench.Opts(steps=2))
    assert [r["kernels"] for r in res["rows"]] == ["pytorch", "loop_sdpa"] and res["loop_sdpa"] == M.LOOP_SDPA
    assert all(r[k] > 0 for r in res["rows"] for k in ("one_shape_ms", "new_shapes_ms", "same_shapes_again_ms"))


def test_random_masks_skip_the_models_signals(tmp_path, monkeypatch):
    """mask_sets with random patches and whole text (--mask-new-rule random's views) runs no forward
    pass for the model's signals, and its masks are those it makes when given them."""
    import exemplars as E
    import train as T
    cfg = tiny_train_cfg(tmp_path, methods="exmask", device="cpu")
    mcfg, state, tok = towers.backbone(cfg, "cpu", T.console(cfg))
    data = T.prepare(T.read_data(cfg, mcfg.vit.image_size), cfg, mcfg, tok)
    model = M.TwoTower(mcfg, 4)
    model.load_state_dict(state, strict=False)
    rows = torch.arange(12)
    noise = E.draw_noise(len(rows), data["patches"].shape[1], data["ids"].shape[1], torch.Generator().manual_seed(0),
                         "random-mask", cfg)
    given = E.mask_sets(model, data, rows, "random-mask", cfg, noise, E.signals(model, data, rows, cfg))
    def no_signals(*a, **k):
        raise RuntimeError("signals computed")
    monkeypatch.setattr(E, "signals", no_signals)
    alone = E.mask_sets(model, data, rows, "random-mask", cfg, noise)
    assert torch.equal(alone["keep_idx"], given["keep_idx"]) and alone["keep"] is given["keep"] is None
    with pytest.raises(RuntimeError, match="signals computed"):   # a rule that needs them still asks
        E.mask_sets(model, data, rows, "exmask", cfg, noise)


def test_masked_views_and_replay_in_one_forward_pass_give_each_loss_as_apart():
    """exmask.concat joins a step's masked new views and its replay batch (other patch counts, other
    caption lengths, mixup fields on one side only); replay.masked_and_replay's terms from the one
    pass equal each batch's own loss (the mean over its rows, times its share of the step's rows)
    and the masked rows' logits equal theirs alone."""
    from replay import masked_and_replay, mixed_ce
    from test_exmask import tiny_model_cfg
    torch.manual_seed(0)
    model = M.TwoTower(tiny_model_cfg(), 3).eval()
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(9):   # 16 patches of 48 values (the tiny towers), 4 or 6 kept; captions of 3 to 9 tokens
        L = int(torch.randint(3, 10, (), generator=g))
        ids = torch.nn.functional.pad(torch.randint(4, 40, (L,), generator=g), (0, 12 - L))
        items.append(exmask.encode(torch.randint(0, 255, (16, 48), generator=g).to(torch.uint8), ids, i % 3, 50, 0,
                                   idx=torch.randperm(16, generator=g)[:4 + 2 * (i % 2)].sort().values))
    rep = exmask.collate(items[:5], 0)
    b = exmask.collate(items[5:], 0)
    mixed = exmask.token_mixup(rep, exmask.take(rep, torch.tensor([4, 3, 2, 1, 0]), 0), torch.tensor([1.0, .5, .2, 0., .7]),
                               0, torch.Generator().manual_seed(0))
    mb = {k: b[k] for k in ("pixels", "patch_idx", "ids", "pos", "labels")}
    mb = dict(mb, pixels=mb["pixels"][:, :3], patch_idx=mb["patch_idx"][:, :3], ids=mb["ids"][:, :2], pos=mb["pos"][:, :2])
    j = exmask.concat([mb, mixed], 0)
    assert j["pixels"].shape[1] == max(3, mixed["pixels"].shape[1]) and j["lam"][:len(mb["labels"])].eq(1).all()
    adjust = torch.tensor([0.1, -0.2, 0.3])
    with torch.no_grad():
        lm, lr, logits = masked_and_replay(model, mb, mixed, 7, 10, 0, adjust)
        alone_m = model.forward_tokens(mb["pixels"], mb["patch_idx"], mb["ids"], mb["pos"])
        alone_r = model.forward_tokens(mixed["pixels"], mixed["patch_idx"], mixed["ids"], mixed["pos"], mixed.get("patch_keep"))
    torch.testing.assert_close(logits, alone_m)
    torch.testing.assert_close(lm, torch.nn.functional.cross_entropy(alone_m + adjust, mb["labels"]) * len(mb["labels"]) / 7)
    torch.testing.assert_close(lr, mixed_ce(alone_r + adjust, mixed) * 5 / 10)
    assert masked_and_replay(model, None, None, 0, 0, 0) == (None, None, None)
    one = masked_and_replay(model, None, mixed, 0, 5, 0)
    assert one[0] is None and one[2] is None
    # under torchrun a process may hold none of the step's rows: its terms are a constant 0
    none = {k: v[:0] for k, v in mixed.items()}
    lm, lr, _ = masked_and_replay(model, None, none, 3, 5, 0)
    assert lm.item() == 0 and lr.item() == 0 and not lr.requires_grad
