"""Tests of extend.py (issue #13): a finished run learns new classes from a new manifest.
CPU only, tiny seeded runs on a few generated classes written as a manifest of PNGs."""
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data as D
from test_exmask import tiny_train_cfg

HERE = os.path.dirname(os.path.abspath(__file__))
SYNTH = D.SynthConfig(n_classes=6, train_per_class=8, test_per_class=4)


def write_manifests(tmp) -> dict:
    """The generated classes as PNGs and manifests: `all` (four classes), and by classes `A`, `B`
    (two each, the phases one run over `all` would make at the seed returned) and `C` (two more)."""
    ds = D.make_synth(SYNTH)
    os.makedirs(tmp / "img")
    rows = []
    for i in range(len(ds["labels"])):
        Image.fromarray(ds["images"][i].permute(1, 2, 0).numpy()).save(tmp / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "text": ds["texts"][i], "label": ds["class_names"][ds["labels"][i]],
                     "split": "test" if ds["is_test"][i] else "train"})
    names = ds["class_names"]
    # A run orders its classes by a seeded permutation of its manifest's (sorted) class names. Two
    # runs (A, then B) give the same head rows to the same classes as one run over A and B only at a
    # seed whose order over the four lists A's classes, then B's, each pair in the order a two-class
    # run gives it: pick the first such seed.
    four = sorted(names[:4])
    for seed in range(100):
        order = [four[i] for i in D.class_order(4, seed)]
        two = D.class_order(2, seed)
        if all([sorted(half)[i] for i in two] == half for half in (order[:2], order[2:])):
            break
    groups = {"all": set(four), "A": set(order[:2]), "B": set(order[2:]), "C": set(names[4:])}
    out = {"seed": seed, "A_names": order[:2], "B_names": order[2:], "C_names": sorted(names[4:]), "rows": rows}
    for k, cls in groups.items():
        path = str(tmp / f"{k}.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, ["image", "text", "label", "split"])
            w.writeheader()
            w.writerows(r for r in rows if r["label"] in cls)
        out[k] = path
    return out


def tree_digest(folder) -> dict:
    return {os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(Path(d, f).read_bytes()).hexdigest()
            for d, _, files in os.walk(folder) for f in files}


def read_json(path):
    with open(path) as f:
        return json.load(f)


def error_of(fn, *a, **k) -> str:
    with pytest.raises(SystemExit) as e:
        fn(*a, **k)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ") and "\n" not in e.value.code
    return e.value.code


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One run over A and B (two phases); a run over A alone (exported), continued with B (exported,
    measured on A's test rows too); the A run's folder digest and serving logits before the continuation."""
    import export as E
    import train as T
    tmp = tmp_path_factory.mktemp("extend")
    m = write_manifests(tmp)
    base = tiny_train_cfg(tmp, methods="exmask", epochs=3, seed=m["seed"], cache_dir=str(tmp / "cache"), synth=SYNTH)
    one = T.train(replace(base, data=m["all"], phases=2, out=str(tmp / "one")))[0]
    T.train(replace(base, data=m["A"], phases=1, out=str(tmp / "a"), export=True))
    a_test = [r for r in m["rows"] if r["label"] in m["A_names"] and r["split"] == "test"]
    before = (tree_digest(tmp / "a"), E.Predictor(str(tmp / "a" / "exmask")).logits(
        [os.path.join(tmp, r["image"]) for r in a_test], [r["text"] for r in a_test]))
    # the notebook form: every setting left at its default is the run's
    cont = T.train(T.Config(continue_from=str(tmp / "a"), data=m["B"], eval_data=m["A"], out=str(tmp / "b"),
                            cache_dir=str(tmp / "cache"), quiet=True))[0]
    return {"tmp": tmp, "m": m, "base": base, "one": one, "cont": cont, "before": before, "a_test": a_test}


def test_a_continued_run_equals_one_run_over_both(runs):
    """Each phase seeds its randomness from (seed, phase index), so the continued phase draws what the
    one run's second phase draws: the same accuracy matrix, memory and final weights, to the bit."""
    one, cont = runs["one"], runs["cont"]
    assert cont["accuracy_matrix"] == one["accuracy_matrix"] and cont["classes_per_phase"] == [2, 2]
    assert cont["memory"] == one["memory"] and cont["memory_per_phase"] == one["memory_per_phase"]
    for k in ("avg_incremental_accuracy", "last_accuracy", "avg_forgetting", "bwt"):
        assert cont[k] == one[k]
    a, b = (torch.load(runs["tmp"] / f / "exmask" / "model.pt", weights_only=True) for f in ("one", "b"))
    assert a["class_names"] == b["class_names"] == runs["m"]["A_names"] + runs["m"]["B_names"]
    assert a["state"].keys() == b["state"].keys() and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    saved = read_json(runs["tmp"] / "b" / "results.json")
    assert saved["accuracy_matrix"] == one["accuracy_matrix"] and saved["settings"]["eval_data"] == runs["m"]["A"]


def test_the_old_run_is_never_modified_and_serves_as_before(runs):
    import export as E
    digest, logits = runs["before"]
    assert tree_digest(runs["tmp"] / "a") == digest
    a_test = runs["a_test"]
    old = E.Predictor(str(runs["tmp"] / "a" / "exmask"))
    assert old.labels == runs["m"]["A_names"]
    now = old.logits([os.path.join(runs["tmp"], r["image"]) for r in a_test], [r["text"] for r in a_test])
    assert np.array_equal(now, logits)


def test_the_new_model_serves_every_class(runs):
    """model.onnx and labels.json of the continued run cover old and new classes; served, a new class's
    test images are recognised as that class, as often as the training code measured."""
    import export as E
    m, tmp = runs["m"], runs["tmp"]
    pred = E.Predictor(str(tmp / "b" / "exmask"))
    assert pred.labels == m["A_names"] + m["B_names"]
    b_test = [r for r in m["rows"] if r["label"] in m["B_names"] and r["split"] == "test"]
    top = pred.predict([os.path.join(tmp, r["image"]) for r in b_test], [r["text"] for r in b_test], top_k=1)
    hits = sum(t[0][0] == r["label"] for t, r in zip(top, b_test))
    assert hits > 0 and abs(100 * hits / len(b_test) - runs["cont"]["accuracy_matrix"][1][1]) <= 100 / len(b_test)


def test_without_eval_data_the_old_classes_are_not_measured(runs):
    """The same training without --eval-data: the new classes' figures are the same, the old classes'
    entries are null and count in no figure."""
    import train as T
    tmp, m = runs["tmp"], runs["m"]
    r = T.train(T.Config(continue_from=str(tmp / "a" / "exmask"), data=m["B"], out=str(tmp / "b-noeval"),
                         cache_dir=str(tmp / "cache"), quiet=True, export=False))[0]
    want = runs["cont"]["accuracy_matrix"]
    assert r["accuracy_matrix"] == [want[0], [None, want[1][1]]]
    assert r["last_accuracy"] == want[1][1] and r["avg_forgetting"] is None and r["bwt"] is None   # not measured
    assert r["memory"] == runs["cont"]["memory"]


def test_metrics_skip_unmeasured_entries():
    from train import metrics
    m = metrics([[90.0], [None, 80.0], [None, 60.0, 70.0]], [[10], [0, 10], [0, 10, 20]])
    assert m["phase_accuracy"] == [90.0, 80.0, pytest.approx(200 / 3)]
    assert m["avg_forgetting"] == 20.0 and m["bwt"] == -20.0


def test_the_cli_continues_a_continued_run_in_several_phases(runs, monkeypatch):
    """python train.py --continue B_RUN --data C.csv --phases 2: a third class set, in two phases, after
    a run that was itself continued (its uneven phase schedule is read from its checkpoint); resuming
    the finished continuation finds nothing left to do."""
    import train as T
    tmp, m = runs["tmp"], runs["m"]
    monkeypatch.setenv("EXMASK_CACHE", str(tmp / "cache"))
    args = ["--continue", str(tmp / "b"), "--data", m["C"], "--eval-data", m["all"], "--phases", "2",
            "--out", str(tmp / "c"), "--no-export"]
    T.main(args)
    r = read_json(tmp / "c" / "results.json")
    assert r["classes_per_phase"] == [2, 2, 1, 1] and r["phases"] == 4 and len(r["accuracy_matrix"][3]) == 4
    assert r["accuracy_matrix"][:2] == runs["cont"]["accuracy_matrix"]
    assert read_json(tmp / "c" / "exmask" / "labels.json")[:4] == m["A_names"] + m["B_names"]
    assert sorted(read_json(tmp / "c" / "exmask" / "labels.json")[4:]) == m["C_names"]
    T.main(args + ["--resume"])
    assert read_json(tmp / "c" / "results.json")["accuracy_matrix"] == r["accuracy_matrix"]


def test_every_mismatch_is_one_error_line_naming_it(runs):
    import train as T
    tmp, m = runs["tmp"], runs["m"]
    run = str(tmp / "a" / "exmask")
    go = lambda **kw: T.train(T.Config(**{"continue_from": run, "data": m["B"], "out": str(tmp / "x"),
                                          "cache_dir": str(tmp / "cache"), "quiet": True, "export": False, **kw}))
    msg = error_of(go, data=m["all"])
    assert "already knows" in msg and all(c in msg for c in m["A_names"])
    assert "keep_image 0.5 given" in error_of(go, keep_image=0.5)
    assert "methods 'replay' given" in error_of(go, methods="replay")
    assert "new_phases" in error_of(go, phases=3)
    assert "vit" in error_of(go, vit="vit_tiny_patch16_224")
    assert "clip" in error_of(go, clip="some/clip")
    assert "model.vit.image_size" in error_of(go, model=replace(runs["base"].model, vit=replace(runs["base"].model.vit,
                                                                                                  image_size=64)))
    assert "cannot split 2 classes into 3 phases" in error_of(go, new_phases=3)
    assert "never modified" in error_of(go, out=str(tmp / "a"))
    assert "never modified" in error_of(go, out=str(tmp / "a" / "exmask" / "more"))
    assert "does not know" in error_of(go, eval_data=m["C"])
    assert "needs --data" in error_of(go, data="")
    assert "no trained run" in error_of(go, continue_from=str(tmp / "cache"))
    unfinished = tmp / "unfinished"
    shutil.copytree(tmp / "a" / "exmask", unfinished)
    ck = torch.load(unfinished / "checkpoint.pt", weights_only=True)
    ck["run"]["phases"] = 2
    torch.save(ck, unfinished / "checkpoint.pt")
    assert "stopped after phase 1/2" in error_of(go, continue_from=str(unfinished))
    two = tmp / "two"
    for k in ("exmask", "replay"):
        shutil.copytree(tmp / "a" / "exmask", two / k)
    assert "several methods (exmask, replay)" in error_of(go, continue_from=str(two))
    with pytest.raises(ValueError, match="continue_from"):
        T.Config(eval_data=m["A"])
    assert not os.path.exists(tmp / "x")                      # every check ran before any work


def test_the_cli_error_is_one_line_and_exit_2(runs):
    tmp, m = runs["tmp"], runs["m"]
    p = subprocess.run([sys.executable, "train.py", "--continue", str(tmp / "a"), "--data", m["A"], "--out",
                        str(tmp / "y")], capture_output=True, text=True, cwd=HERE, check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "already knows" in p.stderr


def test_restating_the_runs_own_tower_setting_is_fine_and_a_failed_export_keeps_the_results(runs, monkeypatch):
    """A model config given with one field that differs from the default but is the run's own (here
    the tiny towers' patch size) is compared on that field alone; a failed ONNX export of the
    continued run still leaves its results.json, picture and model, and ends in one error line."""
    import export
    import train as T
    tmp, m = runs["tmp"], runs["m"]
    default = T.Config().model
    mine = replace(default, vit=replace(default.vit, patch_size=runs["base"].model.vit.patch_size))

    def fail(folder, log=None, **k):
        raise SystemExit("error: ONNX Runtime disagrees with PyTorch (simulated)")

    monkeypatch.setattr(export, "export_run", fail)
    msg = error_of(T.train, T.Config(continue_from=str(tmp / "a"), data=m["B"], out=str(tmp / "e"), model=mine,
                                     cache_dir=str(tmp / "cache"), quiet=True))
    assert "export failed for exmask" in msg
    r = read_json(tmp / "e" / "results.json")
    assert r["phases"] == 2 and r["accuracy_matrix"][1][1] is not None     # the new classes were measured
    assert os.path.exists(tmp / "e" / "accuracy.png") and os.path.exists(tmp / "e" / "exmask" / "model.pt")


def test_continuing_refuses_to_overwrite_mix_or_fail_late(runs, monkeypatch):
    """What review found: a method folder copied out of its run, continued with --out the folder holding
    it, would be overwritten; a model.pt whose towers are not the checkpoint's was accepted; a run that
    stopped before its end (no model.pt) read as no run, or a finished sibling was taken; the run's own
    settings (not only those given) must pass the checks made before any work: oracle-mask's object
    masks, --consistency in one process; --resume of a continuation compares --eval-data too; a
    test-only --eval-data says what it must be."""
    import checkpoints
    import extend
    import ranks
    import train as T
    tmp, m = runs["tmp"], runs["m"]
    go = lambda run, **kw: T.train(T.Config(**{"continue_from": str(run), "data": m["B"], "out": str(tmp / "z"),
                                               "cache_dir": str(tmp / "cache"), "quiet": True, "export": False, **kw}))
    dep = tmp / "deployed"
    shutil.copytree(tmp / "a" / "exmask", dep / "exmask")
    before = tree_digest(dep)
    assert "would write" in error_of(go, dep / "exmask", out=str(dep)) and tree_digest(dep) == before

    def variant(name, edit_ck=None, edit_model=None, drop=()):
        d = tmp / name
        shutil.copytree(tmp / "a" / "exmask", d)
        for f, edit in (("checkpoint.pt", edit_ck), ("model.pt", edit_model)):
            if edit:
                x = torch.load(d / f, weights_only=True)
                edit(x)
                torch.save(x, d / f)
        for f in drop:
            os.remove(d / f)
        return d

    def shift(saved):
        saved["state"]["image.patch_embed.proj.weight"] += 0.5
    assert "different runs" in error_of(go, variant("mixed", edit_model=shift))
    assert "did not finish (no model.pt)" in error_of(go, variant("stopped", drop=("model.pt",)))
    both = tmp / "both"
    shutil.copytree(tmp / "a" / "exmask", both / "exmask")
    shutil.copytree(tmp / "stopped", both / "replay")
    assert "several methods (exmask, replay)" in error_of(go, both)
    oracle = variant("oracle", edit_ck=lambda ck: ck["run"].update(method="oracle-mask"))
    assert "oracle-mask needs object masks" in error_of(go, oracle)
    tied = variant("tied", edit_ck=lambda ck: ck["run"].update(consistency=0.5))
    monkeypatch.setattr(ranks, "world_size", lambda: 2)
    cfg = T.Config(continue_from=str(tied), data=m["B"], out=str(tmp / "z"), cache_dir=str(tmp / "cache"), quiet=True)
    assert "--consistency runs in one process" in error_of(extend.continue_run, cfg, T.console(cfg))
    monkeypatch.undo()
    assert not os.path.exists(tmp / "z")
    test_only = tmp / "A_test.csv"
    with open(m["A"]) as f:
        test_only.write_text("".join(line for i, line in enumerate(f) if i == 0 or line.rstrip().endswith(",test")))
    assert "--eval-data is the run's own manifest" in error_of(go, tmp / "a", eval_data=str(test_only))
    # a run without --eval-data keeps the data hash it always had (the manifest's bytes alone)
    import hashlib
    plain = hashlib.blake2b(Path(m["A"]).read_bytes(), digest_size=8).hexdigest()
    assert checkpoints.data_identity(T.Config(data=m["A"])) == plain
    go(tmp / "a", out=str(tmp / "rb"))
    assert "another data" in error_of(go, tmp / "a", out=str(tmp / "rb"), eval_data=m["A"], resume=True)
