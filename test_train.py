"""Tests of train.py: the phase loop, replay, checkpoints, the CLI, and exmask inside training.
CPU only, tiny seeded configs (tiny_train_cfg from test_exmask). Run: python -m pytest -q"""
import json
import os
from dataclasses import replace

import pytest
import torch

import data as D
import exmask
import models as M
from test_exmask import tiny_train_cfg

torch.set_num_threads(2)

# ----------------------------------------------------------------------------- training

def test_metrics():
    from train import metrics
    m = metrics([[90.0], [70.0, 80.0], [50.0, 60.0, 70.0]], [[10], [10, 10], [10, 10, 20]])
    assert m["phase_accuracy"] == [90.0, 75.0, 62.5]
    assert m["last_accuracy"] == 62.5 and m["avg_incremental_accuracy"] == pytest.approx(75.833, abs=1e-3)
    assert m["avg_forgetting"] == pytest.approx(((90 - 50) + (80 - 60)) / 2)
    assert m["bwt"] == pytest.approx(((50 - 90) + (60 - 80)) / 2)


def test_unmeasured_figures_are_none_and_single_runs_show_no_std(monkeypatch):
    """One phase measures no forgetting: None (null in results.json, "–" in the table), not 0. A method
    run once shows its figure alone beside a method run over seeds (mean ± sample std); the picture
    draws one line per method, the mean of its runs."""
    import io
    from rich.console import Console
    import pictures
    from train import metrics, show, summarize
    one = metrics([[80.0]], [[10]])
    assert one["avg_forgetting"] is None and one["bwt"] is None and one["last_accuracy"] == 80.0
    run = lambda method, acc, **m: {"method": method, "avg_incremental_accuracy": acc, "last_accuracy": acc,
                                    "phase_accuracy": [acc + 10, acc - 10], "trainable_params": 1, "phase_seconds": [1.0],
                                    "memory": {"exemplars_per_class": 2.0, "bytes_used": 5}, **{"avg_forgetting": 3.0,
                                                                                                "bwt": -3.0, **m}}
    results = [run("replay", 70.0), run("replay", 74.0), run("exmask", 80.0, avg_forgetting=None, bwt=None)]
    rows = {r["method"]: r for r in summarize(results)}
    assert rows["replay"]["avg_incremental_accuracy"] == 72.0 and rows["replay"]["avg_incremental_accuracy_std"] == \
        pytest.approx(2 ** 0.5 * 2)                                                  # the sample std, n - 1
    assert rows["exmask"]["avg_incremental_accuracy_std"] is None and rows["exmask"]["avg_forgetting"] is None
    out = io.StringIO()
    show(results, Console(file=out, width=200))
    table = out.getvalue()
    import re
    assert "72.00 ± 2.83" in table and "80.00 ±" not in table and re.search(r"│ +80\.00 │ +80\.00 │ +– │ +– │", table)
    texts = []
    monkeypatch.setattr(pictures.D, "write_atomic", lambda path, fn: None)
    from PIL import ImageDraw
    orig = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, text, *a, **k: (texts.append(text), orig(self, xy, text, *a, **k))[1])
    pictures.draw_accuracy("unused.png", results)
    assert "replay 72.0 (2 runs)" in texts and "exmask 80.0" in texts and sum(t.startswith("replay") for t in texts) == 1


def test_train_end_to_end_writes_results_and_caches_backbone(tmp_path):
    from train import train
    cfg = tiny_train_cfg(tmp_path, methods="finetune,replay,joint")
    results = train(cfg)
    saved = json.load(open(os.path.join(cfg.out, "results.json")))
    assert saved == json.loads(json.dumps(results))
    for r in results:
        for key in ("method", "seed", "phases", "classes_per_phase", "accuracy_matrix", "avg_incremental_accuracy",
                    "last_accuracy", "avg_forgetting", "bwt", "phase_seconds", "trainable_params", "memory"):
            assert key in r
        assert len(r["accuracy_matrix"]) == 2 and len(r["accuracy_matrix"][1]) == 2
        assert set(r["memory"]) >= {"budget_bytes", "bytes_used", "exemplars", "exemplars_per_class",
                                    "mean_kept_patches", "mean_kept_tokens"}
    replay = results[1]["memory"]
    assert 0 < replay["bytes_used"] <= replay["budget_bytes"] and replay["exemplars_per_class"] == 2
    assert results[0]["memory"]["exemplars"] == 0
    assert len(os.listdir(cfg.cache_dir)) == 1                      # the pretrained towers, cached
    assert os.path.exists(os.path.join(cfg.out, "replay", "model.pt"))


def test_resume_continues_where_it_stopped(tmp_path, monkeypatch):
    import train as T
    cfg = tiny_train_cfg(tmp_path, phases=3, synth=D.SynthConfig(n_classes=6, train_per_class=8, test_per_class=4))
    want = T.train(replace(cfg, out=str(tmp_path / "a")))[0]
    real_save, calls = T.save_checkpoint, []

    def crash_after_two(path, ck):
        real_save(path, ck)
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "save_checkpoint", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        T.train(replace(cfg, out=str(tmp_path / "b")))
    monkeypatch.setattr(T, "save_checkpoint", real_save)
    crashed = torch.load(os.path.join(tmp_path, "b", "replay", "checkpoint.pt"), weights_only=True)
    trained, real_phase = [], T.train_phase
    monkeypatch.setattr(T, "train_phase", lambda *a, **k: (trained.append(a[-1]), real_phase(*a, **k))[1])
    got = T.train(replace(cfg, out=str(tmp_path / "b"), resume=True))[0]
    assert got["accuracy_matrix"] == want["accuracy_matrix"] and got["memory"] == want["memory"]
    assert trained == ["[replay] phase 3/3"]                       # only the phase left: the first two resumed
    assert got["phase_seconds"][:2] == crashed["secs"]              # their times from the checkpoint, not redone


def test_memory_bytes_option_and_modalities(tmp_path):
    from train import train
    r = train(tiny_train_cfg(tmp_path, memory_bytes=5000))[0]
    assert r["memory"]["budget_bytes"] == 5000 and r["memory"]["bytes_used"] <= 5000
    r = train(tiny_train_cfg(tmp_path, methods="replay", out=str(tmp_path / "t"),
                             model=replace(tiny_train_cfg(tmp_path).model, modalities="text", adapter="prompt")))[0]
    assert r["modalities"] == "text" and r["adapter"] == "prompt"


def test_bad_method_and_cli_parse(tmp_path):
    import train as T
    with pytest.raises(ValueError, match="unknown method"):
        T.Config(methods="replay,magic")
    with pytest.raises(ValueError, match="share"):
        T.Config(keep_image=1.5)
    with pytest.raises(ValueError, match="budget"):
        T.Config(memory_per_class=0)
    with pytest.raises(SystemExit):
        T.main(["--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        T.main(["--keep-text", "2", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="cannot split 4 classes into 3 phases"):
        T.train(tiny_train_cfg(tmp_path, phases=3))


# ----------------------------------------------------------------------------- exmask: in training

def test_exmask_fits_more_exemplars_in_the_same_bytes(tmp_path):
    from train import train
    cfg = tiny_train_cfg(tmp_path, methods="replay,exmask", memory_per_class=1.5, keep_image=0.25, keep_text=0.5,
                         recombine=0.5, token_mixup=0.5, mask_new=0.5, context_weight=2.0, smooth_image=1)
    rep, ex = train(cfg)
    assert ex["memory"]["bytes_used"] <= ex["memory"]["budget_bytes"] == rep["memory"]["budget_bytes"]
    assert ex["memory"]["exemplars_per_class"] >= 3 * rep["memory"]["exemplars_per_class"]
    assert ex["memory"]["mean_kept_patches"] == exmask.keep_count(16, 0.25)
    assert ex["settings"]["recombine"] == 0.5 and ex["settings"]["smooth_image"] == 1
    assert os.path.exists(os.path.join(cfg.out, "exmask", "masked_exemplars.png"))
    assert os.path.exists(os.path.join(cfg.out, "accuracy.png"))


@pytest.mark.parametrize("replay", ["epoch", "batch"])
def test_replay_modes(tmp_path, monkeypatch, replay):
    """epoch: each stored exemplar is replayed exactly once per epoch, spread over the steps;
    batch: every step draws batch_size exemplars."""
    import train as T
    calls, real = [], T.replay_batch

    def spy(bank, rows, *a, **k):
        calls.append((len(bank["counts"]), rows.tolist()))
        return real(bank, rows, *a, **k)

    monkeypatch.setattr(T, "replay_batch", spy)
    T.train(tiny_train_cfg(tmp_path, methods="exmask", epochs=2, batch_size=4, replay=replay))
    n_mem = calls[0][0]
    assert n_mem > 1 and len(calls) == 2 * 4                # phase 2: 2 epochs of 16 new samples in batches of 4
    if replay == "batch":
        assert all(len(ids) == 4 for _, ids in calls)
    else:
        for epoch in (calls[:4], calls[4:]):
            ids = [i for _, batch in epoch for i in batch]
            assert len(ids) == n_mem and len(set(ids)) == n_mem
    with pytest.raises(ValueError, match="replay"):
        T.Config(replay="sometimes")


def test_every_ablation_runs_over_seeds(tmp_path):
    from train import MASKING, summarize, train
    cfg = tiny_train_cfg(tmp_path, methods=",".join(MASKING), seeds="0,1", keep_text=0.8,
                         synth=D.SynthConfig(n_classes=4, train_per_class=4, test_per_class=2))
    results = train(cfg)
    n = len(MASKING)
    assert [r["method"] for r in results] == list(MASKING) * 2 and [r["seed"] for r in results] == [0] * n + [1] * n
    by = {r["method"]: r for r in results if r["seed"] == 0}
    assert by["image-mask"]["memory"]["mean_kept_patches"] < 16 and by["text-mask"]["memory"]["mean_kept_patches"] == 16
    assert by["text-mask"]["memory"]["mean_kept_tokens"] < by["image-mask"]["memory"]["mean_kept_tokens"]
    rows = summarize(results)
    assert len(rows) == n and all(r["runs"] == 2 for r in rows)
    first, second = results[0], results[n]                 # exmask, seeds 0 and 1: another class order and draw
    assert first["accuracy_matrix"] != second["accuracy_matrix"]


def test_logit_prior_is_the_log_share_of_each_class():
    from replay import logit_prior
    counts = torch.tensor([30.0, 10.0, 0.0])                 # a class never shown counts as shown once
    assert torch.allclose(logit_prior(counts, 1.0), torch.log(torch.tensor([30.0, 10.0, 1.0]) / 41))
    assert torch.allclose(logit_prior(counts, 0.5), 0.5 * logit_prior(counts, 1.0))
    assert torch.equal(logit_prior(counts, 0.0), torch.zeros(3))
    # softmax(logits + prior) of a head that says nothing (equal logits) is the training prior itself:
    # the head is left to learn only what the prior does not explain
    p = torch.softmax(torch.zeros(3) + logit_prior(counts, 1.0), 0)
    assert torch.allclose(p, torch.tensor([30.0, 10.0, 1.0]) / 41)


def test_logit_adjust_counts_new_rows_and_exemplars_per_class(tmp_path, monkeypatch):
    """Phase 2 of a replay run: each new class is shown its 8 training rows an epoch, each old class its
    stored exemplars; the losses get the prior, evaluation does not."""
    import train as T
    seen, real = [], T.logit_prior

    def spy(counts, tau):
        seen.append((counts.clone(), tau))
        return real(counts, tau)

    monkeypatch.setattr(T, "logit_prior", spy)
    res = T.train(tiny_train_cfg(tmp_path, methods="replay", logit_adjust=0.7))[0]
    assert [tau for _, tau in seen] == [0.7, 0.7]
    first, second = seen[0][0], seen[1][0]
    assert first.tolist() == [8.0, 8.0]                       # phase 1: two new classes of 8 rows
    assert second[2:].tolist() == [8.0, 8.0] and second[:2].tolist() == [res["memory"]["exemplars_per_class"]] * 2
    assert res["settings"]["logit_adjust"] == 0.7
    base = T.train(tiny_train_cfg(tmp_path / "b", methods="replay", logit_adjust=0.0))[0]
    assert base["settings"]["logit_adjust"] == 0.0 and base["accuracy_matrix"] != res["accuracy_matrix"]
    with pytest.raises(ValueError, match="logit_adjust"):
        T.Config(logit_adjust=-1)


def test_mask_new_rule_masks_the_new_views_at_random(tmp_path, monkeypatch):
    """--mask-new-rule random: exmask's new rows are shown masked by random-mask's rule (random
    patches, the same share), its exemplars still by its own; "method" (the default) masks both
    by the method's rule. The CLI reaches Config and results.json records it."""
    import train as T
    rules, real = [], T.mask_sets

    def spy(model, data, rows, method, cfg, noise, sig=None):
        rules.append(method)
        m = real(model, data, rows, method, cfg, noise, sig)
        if method == "random-mask":   # random patches: as many as the method's share keeps
            assert m["keep_idx"].shape[1] == exmask.keep_count(data["patches"].shape[1], cfg.keep_image)
        return m

    monkeypatch.setattr(T, "mask_sets", spy)
    res = T.train(tiny_train_cfg(tmp_path, methods="exmask", mask_new_rule="random"))[0]
    assert rules == ["random-mask"] and res["settings"]["mask_new_rule"] == "random"
    rules.clear()
    T.train(tiny_train_cfg(tmp_path / "b", methods="exmask"))
    assert rules == ["exmask"] and T.Config().mask_new_rule == "method"
    with pytest.raises(ValueError, match="mask_new_rule"):
        T.Config(mask_new_rule="object")
    seen = {}
    monkeypatch.setattr(T, "train", lambda cfg: seen.setdefault("cfg", cfg))
    T.main(["--mask-new-rule", "random", "--out", str(tmp_path / "o")])
    assert seen["cfg"].mask_new_rule == "random"


def test_no_masked_views_where_the_rule_masks_nothing(tmp_path, monkeypatch):
    """A text-only model with whole captions: exmask's masked view of a new row would be the row
    itself, so none is made or trained on (each new row once, not twice); with a text share below 1
    the views are made again. exemplars.masks_anything says which."""
    import train as T
    from exemplars import masks_anything
    calls, real = [], T.mask_sets
    monkeypatch.setattr(T, "mask_sets", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    mcfg = tiny_train_cfg(tmp_path).model
    text_only = replace(mcfg, modalities="text")
    T.train(tiny_train_cfg(tmp_path / "a", methods="exmask", model=text_only))
    assert calls == []
    T.train(tiny_train_cfg(tmp_path / "b", methods="exmask", model=text_only, keep_text=0.5))
    assert calls == ["exmask"]
    model, cfg = M.TwoTower(text_only, 4), T.Config()
    assert not masks_anything(model, "exmask", cfg) and masks_anything(M.TwoTower(mcfg, 4), "exmask", cfg)
    assert not masks_anything(M.TwoTower(mcfg, 4), "text-mask", cfg) and not masks_anything(model, "replay", cfg)


def test_consistency_pulls_masked_views_toward_their_whole_view(tmp_path, monkeypatch):
    """replay.consistency is KL(whole || masked): 0 for the same prediction, more the further apart,
    and its gradient reaches only the masked logits. --consistency W adds it with weight W to each
    new sample's masked view in training: another run, recorded in results.json."""
    import train as T
    from replay import consistency
    whole = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], requires_grad=True)
    assert consistency(whole.detach().clone(), whole).item() == pytest.approx(0.0, abs=1e-7)
    near, far = whole.detach() + torch.tensor([0.1, 0.0, 0.0]), whole.detach().flip(1)
    masked = far.clone().requires_grad_()
    assert 0 < consistency(near, whole).item() < consistency(far, whole).item()
    consistency(masked, whole).backward()
    assert masked.grad.abs().sum() > 0 and whole.grad is None
    base = T.train(tiny_train_cfg(tmp_path / "a", methods="exmask", keep_image=0.25))[0]   # 4 of 16 patches
    tied = T.train(tiny_train_cfg(tmp_path / "b", methods="exmask", keep_image=0.25, consistency=2.0))[0]
    assert tied["settings"]["consistency"] == 2.0 and base["settings"]["consistency"] == 0.0
    heads = [torch.load(os.path.join(tmp_path, r, "run", "exmask", "model.pt"), weights_only=True)["state"]["head.weight"]
             for r in ("a", "b")]
    assert not torch.equal(*heads)                                # the term changed what was learned
    with pytest.raises(ValueError, match="consistency"):
        T.Config(consistency=-1)
    monkeypatch.setattr(T.ranks, "world_size", lambda: 2)   # under torchrun: refused up front
    with pytest.raises(SystemExit, match="one process"):
        T.train(tiny_train_cfg(tmp_path / "c", methods="exmask", consistency=1.0))


def test_adjust_views_gives_whole_and_masked_rows_each_their_own_prior(tmp_path, monkeypatch):
    """--adjust-views (the default), phase 2 of exmask: the whole rows' prior counts the new rows alone (the old
    classes are never shown whole), the masked rows' prior the new rows' masked views and the
    exemplars; each reaches its own loss. Without it: one prior, their sum. Replay keeps one."""
    import train as T
    seen, real = [], T.logit_prior
    got = {"new": [], "masked": []}
    real_new, real_mr = T.new_loss, T.masked_and_replay

    def spy(counts, tau):
        seen.append(counts.clone())
        return real(counts, tau)

    def new_spy(model, data, rows, device, adjust=None, *a):
        got["new"].append(adjust)
        return real_new(model, data, rows, device, adjust, *a)

    def mr_spy(model, m, r, n_m, n_r, pad, adjust=None):
        got["masked"].append(adjust)
        return real_mr(model, m, r, n_m, n_r, pad, adjust)

    monkeypatch.setattr(T, "logit_prior", spy)
    monkeypatch.setattr(T, "new_loss", new_spy)
    monkeypatch.setattr(T, "masked_and_replay", mr_spy)
    res = T.train(tiny_train_cfg(tmp_path, methods="exmask"))[0]   # the default: adjust_views
    kept = res["memory"]["exemplars_per_class"]
    assert [c.tolist() for c in seen] == [[8.0, 8.0], [0.0, 0.0, 8.0, 8.0], [kept, kept, 8.0, 8.0]]
    whole, masked = real(seen[1], 1.0), real(seen[2], 1.0)
    assert torch.equal(got["new"][-1], whole) and torch.equal(got["masked"][-1], masked)   # phase 2 has one step
    assert res["settings"]["adjust_views"] is True
    seen.clear()
    T.train(tiny_train_cfg(tmp_path / "b", methods="exmask", adjust_views=False))
    assert [c.tolist() for c in seen] == [[8.0, 8.0], [kept, kept, 16.0, 16.0]]
    seen.clear()
    T.train(tiny_train_cfg(tmp_path / "c", methods="replay"))
    assert len(seen) == 2
    cli = []
    monkeypatch.setattr(T, "train", cli.append)
    T.main([])
    T.main(["--adjust-views", "0"])
    assert cli[0].adjust_views is True and cli[1].adjust_views is False


def test_batch_replay_prior_counts_the_replayed_half_as_much_as_the_new_half(tmp_path, monkeypatch):
    """--replay batch: each step's loss is (new rows + their masked views) / 2 + (replayed rows) / 2, so
    the masked prior counts the exemplars together as many as the new rows and views they stand beside."""
    import train as T
    seen, real = [], T.logit_prior

    def spy(counts, tau):
        seen.append(counts.clone())
        return real(counts, tau)

    monkeypatch.setattr(T, "logit_prior", spy)
    T.train(tiny_train_cfg(tmp_path, methods="exmask", replay="batch", balanced_head=0))
    whole, masked = seen[-2], seen[-1]                       # phase 2, adjust_views: one prior per view
    assert whole.tolist() == [0.0, 0.0, 8.0, 8.0]            # the new classes' rows
    assert masked[2:].tolist() == [8.0, 8.0]                 # their masked views (--mask-new 1)
    assert float(masked[:2].sum()) == pytest.approx(float(whole.sum() + masked[2:].sum()))


def test_problems_with_options_are_one_line_before_any_training(tmp_path, monkeypatch, capsys):
    import train as T
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:            # a bad value: one line, exit 2, no usage block
        T.main(["--keep-image", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: keep_image")
    with pytest.raises(SystemExit) as e:            # bad data: no empty run folder left behind
        T.main(["--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and not os.path.exists(tmp_path / "o")
    with pytest.raises(ValueError, match="give --vit too"):
        T.Config(vit_file="weights.safetensors")
    assert T.data_name("data/icons-dev/manifest.csv") == "icons-dev" and T.data_name("a/b.jsonl") == "b"
    assert T.data_name("") == "default"

    def no_training(*a, **k):
        raise AssertionError("trained before the check")
    monkeypatch.setattr(T, "train_phase", no_training)
    with pytest.raises(SystemExit, match="--lowres 3 must divide the image side"):
        T.train(tiny_train_cfg(tmp_path, methods="exmask", lowres=3))
    with pytest.raises(SystemExit, match="oracle-mask needs object masks"):
        T.check_methods(tiny_train_cfg(tmp_path, methods="oracle-mask"), tiny_train_cfg(tmp_path).model, {}, None)
    said = []
    con = type("Con", (), {"print": lambda self, m: said.append(m)})()
    T.check_methods(tiny_train_cfg(tmp_path, methods="exmask,image-mask,text-mask"), tiny_train_cfg(tmp_path).model,
                    {}, con)
    assert len(said) == 2 and "image-mask stores exmask itself" in said[0] and "text-mask stores replay's" in said[1]
    said.clear()
    T.check_methods(tiny_train_cfg(tmp_path, methods="image-mask,text-mask", keep_text=0.8),
                    tiny_train_cfg(tmp_path).model, {}, con)
    assert said == []


def test_a_failed_export_loses_no_results_and_the_next_method_still_runs(tmp_path, monkeypatch):
    import export
    import train as T
    tried = []

    def fail(folder, log=None, **k):
        tried.append(os.path.basename(folder))
        raise SystemExit("error: ONNX Runtime disagrees with PyTorch (simulated)")

    monkeypatch.setattr(export, "export_run", fail)
    cfg = tiny_train_cfg(tmp_path, methods="replay,finetune", export=True)
    with pytest.raises(SystemExit, match="export failed for replay, finetune"):
        T.train(cfg)
    assert tried == ["replay", "finetune"]
    res = json.load(open(os.path.join(cfg.out, "results.json")))
    assert [r["method"] for r in res] == ["replay", "finetune"]
    assert os.path.exists(os.path.join(cfg.out, "replay", "model.pt"))


def test_resume_refuses_other_data_or_other_backbone_weights(tmp_path):
    """run_identity records hashes of the data and of the frozen towers; a checkpoint written before
    they were recorded is trusted."""
    import checkpoints as C
    import train as T
    cfg = tiny_train_cfg(tmp_path, phases=3, synth=D.SynthConfig(n_classes=6, train_per_class=8, test_per_class=4))
    T.train(cfg)
    with pytest.raises(SystemExit, match="another data"):
        T.train(replace(cfg, resume=True, synth=replace(cfg.synth, seed=cfg.synth.seed + 1)))
    with pytest.raises(SystemExit, match="another backbone"):
        T.train(replace(cfg, resume=True, pretrain=replace(cfg.pretrain, seed=cfg.pretrain.seed + 1)))
    path = C.checkpoint_path(os.path.join(cfg.out, "replay"))
    ck = torch.load(path, weights_only=True)
    for k in C.LATER:
        del ck["run"][k]
    C.save_checkpoint(path, ck)
    assert T.train(replace(cfg, resume=True))[0]["accuracy_matrix"] == ck["R"]   # nothing left to train


def test_mixup_replay_swaps_within_a_class_and_mixes_tokens_in_training(tmp_path, monkeypatch):
    """--recombine 1: every replayed exemplar takes the caption of a partner of its own class;
    --token-mixup 1: every one is token-mixed with another (lam in [0, 1], not all 1); at 0, neither runs."""
    import replay
    import train as T
    calls = {"recombine": [], "token_mixup": []}
    real_r, real_t = replay.exmask.recombine, replay.exmask.token_mixup

    def recombine(a, b, which, pad):
        calls["recombine"].append((a["labels"].tolist(), b["labels"].tolist(), which.tolist()))
        return real_r(a, b, which, pad)

    def token_mixup(a, b, lam, pad, gen):
        calls["token_mixup"].append(lam.tolist())
        return real_t(a, b, lam, pad, gen)

    monkeypatch.setattr(replay.exmask, "recombine", recombine)
    monkeypatch.setattr(replay.exmask, "token_mixup", token_mixup)
    T.train(tiny_train_cfg(tmp_path, methods="exmask", recombine=1.0, token_mixup=1.0))
    assert calls["recombine"] and all(a == b and all(w) for a, b, w in calls["recombine"])
    lams = [x for lam in calls["token_mixup"] for x in lam]
    assert lams and all(0 <= x <= 1 for x in lams) and min(lams) < 1
    calls = {"recombine": [], "token_mixup": []}
    T.train(tiny_train_cfg(tmp_path / "off", methods="exmask"))
    assert calls == {"recombine": [], "token_mixup": []}


def test_mask_new_shows_that_share_of_the_new_rows_masked(tmp_path, monkeypatch):
    """--mask-new 0.5: about half the new rows are also shown masked, and the masked prior counts half
    of each new class's rows."""
    import train as T
    shown, seen = [], []
    real_mb, real_prior = T.masked_batch, T.logit_prior
    monkeypatch.setattr(T, "masked_batch", lambda data, rows, *a, **k: (shown.append(len(rows)), real_mb(data, rows, *a, **k))[1])
    monkeypatch.setattr(T, "logit_prior", lambda counts, tau: (seen.append(counts.clone()), real_prior(counts, tau))[1])
    T.train(tiny_train_cfg(tmp_path, methods="exmask", mask_new=0.5, epochs=4, balanced_head=0))
    assert 0.25 * 4 * 16 < sum(shown) < 0.75 * 4 * 16          # phase 2: 4 epochs of 16 new rows
    assert seen[-1][2:].tolist() == [4.0, 4.0]                  # the masked prior: half of 8 rows a class


def test_every_command_line_option_reaches_the_config(tmp_path, monkeypatch):
    """main() hands every option to Config: each given a value other than its default."""
    import train as T
    got = []
    monkeypatch.setattr(T, "train", got.append)
    T.main(["--memory-bytes", "12345", "--seed", "3", "--seeds", "1,2", "--epochs", "2", "--lr", "0.003",
            "--device", "cpu", "--no-export", "--adapter", "prompt", "--modalities", "image", "--lowres", "2",
            "--smooth-image", "1", "--herding", "masked", "--mask-candidates", "4", "--recombine", "0.25",
            "--token-mixup", "0.5", "--mask-new", "0.75", "--consistency", "0.1", "--logit-adjust", "0.5",
            "--replay", "batch", "--batch-size", "7", "--first-phase", "4", "--keep-image", "0.2",
            "--keep-text", "0.8", "--image-mask", "attn", "--fill", "copies", "--mask-new-rule", "random",
            "--adjust-views", "0", "--balanced-head", "0", "--dist-timeout", "60", "--out", str(tmp_path / "o"),
            "--text-model", "some/bert", "--compile", "--resume", "--val", "0.1"])
    c = got[0]
    assert (c.memory_bytes, c.seed, c.seeds, c.epochs, c.lr, c.device, c.export) == (12345, 3, "1,2", 2, 0.003, "cpu", False)
    assert (c.model.adapter, c.model.modalities, c.lowres, c.smooth_image, c.herding, c.mask_candidates) == \
        ("prompt", "image", 2, 1, "masked", 4)
    assert (c.recombine, c.token_mixup, c.mask_new, c.consistency, c.logit_adjust, c.replay, c.batch_size) == \
        (0.25, 0.5, 0.75, 0.1, 0.5, "batch", 7)
    assert (c.first_phase, c.keep_image, c.keep_text, c.image_mask, c.fill, c.mask_new_rule, c.adjust_views) == \
        (4, 0.2, 0.8, "attn", "copies", "random", False)
    assert (c.balanced_head, c.dist_timeout, c.out, c.text_model, c.compile, c.resume, c.val) == \
        (0, 60, str(tmp_path / "o"), "some/bert", True, True, 0.1)
    T.main(["--memory-per-class", "3", "--continue", str(tmp_path / "run"), "--data", "new.csv",
            "--eval-data", "old.csv", "--phases", "2"])
    c = got[1]
    assert (c.memory_per_class, c.continue_from, c.data, c.eval_data, c.new_phases) == \
        (3, str(tmp_path / "run"), "new.csv", "old.csv", 2)
