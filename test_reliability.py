"""Tests of bad input and interrupted runs (issue #10): every manifest problem is one `error:` line
found before any long work, splits never move data silently, --resume refuses another run's
checkpoint, files are written atomically. CPU only, tiny generated data."""
import csv
import errno
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import data as D
from test_exmask import tiny_train_cfg

torch.set_num_threads(2)


def manifest(tmp_path, rows, name="m.csv", encoding="utf-8", fields=("image", "text", "label", "split")) -> str:
    """A CSV manifest over tiny PNGs: rows of (label, split, text)."""
    os.makedirs(tmp_path / "img", exist_ok=True)
    out = []
    for i, (label, split, text) in enumerate(rows):
        Image.fromarray(np.full((8, 8, 3), 10 * i % 255, np.uint8)).save(tmp_path / "img" / f"{i}.png")
        out.append({"image": f"img/{i}.png", "text": text, "label": label, "split": split})
    path = str(tmp_path / name)
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        w.writerows(out)
    return path


def error_of(fn, *a, **k) -> str:
    with pytest.raises(SystemExit) as e:
        fn(*a, **k)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ") and "\n" not in e.value.code
    return e.value.code


def test_latin1_manifest_names_the_byte_and_suggests_the_encoding(tmp_path):
    path = manifest(tmp_path, [("a", "train", "plain"), ("b", "train", "café crème")], encoding="latin-1")
    msg = error_of(D.read_rows, path)
    assert "not UTF-8" in msg and "byte 0xe9" in msg and "line 3" in msg and "iconv" in msg


def test_a_byte_order_mark_is_read_like_plain_utf8(tmp_path):
    path = manifest(tmp_path, [("a", "train", "x"), ("a", "test", "y")], encoding="utf-8-sig")
    assert open(path, "rb").read(3) == b"\xef\xbb\xbf"
    rows = D.read_rows(path)
    assert [r["label"] for r in rows] == ["a", "a"] and rows[0]["image"] == "img/0.png"


def test_a_phase_without_test_rows_is_refused_before_any_work(tmp_path):
    import train as T
    path = manifest(tmp_path, [("a", "train", "x"), ("a", "test", "y"), ("b", "train", "z")])
    cfg = tiny_train_cfg(tmp_path, data=path, phases=2)
    assert "no test rows" in error_of(T.train, cfg) and not os.path.exists(cfg.cache_dir)


def test_a_class_without_training_rows_is_named(tmp_path):
    path = manifest(tmp_path, [("a", "train", "x"), ("a", "test", "y"), ("lonely", "test", "z")])
    assert "'lonely'" in error_of(D.manifest_table, path)


@pytest.mark.parametrize("splits,where", [(["train", "val", "test"], "'val' on line(s) 3"),
                                          (["train", "", "test"], "blank on line(s) 3"),
                                          (["train", "Validation", "TEST"], "line(s) 3")])
def test_splits_are_train_or_test_and_never_move_silently(tmp_path, splits, where):
    path = manifest(tmp_path, [("a", s, "x") for s in splits])
    assert where in error_of(D.manifest_table, path)


def test_splits_in_any_case_and_none_at_all(tmp_path):
    _, _, _, is_test = D.manifest_table(manifest(tmp_path, [("a", "Train", "x"), ("a", "TEST", "y")]))
    assert is_test.tolist() == [False, True]
    path = manifest(tmp_path, [("a", "", "x")] * 5, name="nosplit.csv")
    _, _, _, is_test = D.manifest_table(path)                  # no split given: the seeded one
    assert int(is_test.sum()) == 1


def test_an_empty_label_names_its_line(tmp_path):
    path = manifest(tmp_path, [("a", "train", "x"), ("", "train", "y")])
    assert "line 3" in error_of(D.read_rows, path) and "'label'" in error_of(D.read_rows, path)


@pytest.mark.parametrize("phases,first", [(2, 4), (5, 0), (3, 3)])
def test_phase_splits_with_an_empty_phase_are_refused_before_any_work(tmp_path, phases, first):
    import train as T
    cfg = tiny_train_cfg(tmp_path, phases=phases, first_phase=first)
    assert "every phase needs a class" in error_of(T.train, cfg)
    assert not os.path.exists(cfg.cache_dir)                   # nothing pretrained or cached first


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    import train as T
    cfg = tiny_train_cfg(tmp_path)
    T.train(cfg)
    msg = error_of(T.train, replace(cfg, resume=True, seed=1))
    assert "seed: 0 there, 1 now" in msg
    assert "keep_image" in error_of(T.train, replace(cfg, resume=True, keep_image=0.5, methods="replay"))
    assert T.train(replace(cfg, resume=True))[0]["seed"] == 0  # the same settings resume (nothing left to do)


def test_a_corrupt_checkpoint_says_how_to_start_over(tmp_path):
    import train as T
    cfg = tiny_train_cfg(tmp_path)
    T.train(cfg)
    ck = os.path.join(cfg.out, "replay", "checkpoint.pt")
    with open(ck, "r+b") as f:
        f.truncate(100)
    assert "delete it" in error_of(T.train, replace(cfg, resume=True))


def test_a_failed_write_keeps_the_last_good_file(tmp_path):
    path = str(tmp_path / "results.json")
    D.write_atomic(path, lambda tmp: open(tmp, "w").write("good"))

    def full_disk(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        D.write_atomic(path, full_disk)
    assert open(path).read() == "good" and os.listdir(tmp_path) == ["results.json"]


def test_the_cli_prints_one_error_line_and_exits_2(tmp_path):
    path = manifest(tmp_path, [("a", "train", "x"), ("b", "training", "y")])
    p = subprocess.run([sys.executable, "train.py", "--data", path, "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert p.returncode == 2 and p.stderr.strip().startswith("error: ") and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


class Payload:
    """An object whose unpickling would run code: a checkpoint must never load it."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_checkpoint_with_a_pickle_payload_is_refused(tmp_path):
    import train as T
    cfg = tiny_train_cfg(tmp_path)
    T.train(cfg)
    ck = os.path.join(cfg.out, "replay", "checkpoint.pt")
    torch.save({"run": Payload()}, ck)
    assert "cannot read checkpoint" in error_of(T.train, replace(cfg, resume=True))


def test_unreadable_cached_towers_are_pretrained_again(tmp_path):
    import train as T
    import towers
    cfg = tiny_train_cfg(tmp_path)
    towers.default_backbone(cfg, "cpu", T.console(cfg))
    (path,) = [os.path.join(cfg.cache_dir, f) for f in os.listdir(cfg.cache_dir) if f.startswith("backbone-")]
    torch.save({"state": Payload()}, path)
    import io
    from rich.console import Console
    out = io.StringIO()
    mcfg, state, tok = towers.default_backbone(cfg, "cpu", Console(file=out, width=300))
    assert "unreadable" in out.getvalue() and "pretraining again" in out.getvalue() and len(state) > 10
    assert torch.load(path, weights_only=True)["state"].keys() == state.keys()


def test_the_same_seed_gives_the_same_results(tmp_path):
    import train as T
    cfg = tiny_train_cfg(tmp_path, methods="exmask", phases=3,
                         synth=D.SynthConfig(n_classes=6, train_per_class=8, test_per_class=4))
    a = T.train(replace(cfg, out=str(tmp_path / "a")))[0]
    b = T.train(replace(cfg, out=str(tmp_path / "b")))[0]
    for r in (a, b):
        r.pop("phase_seconds")
    assert a == b


def test_killed_runs_resume_to_the_uninterrupted_results(tmp_path):
    """`python train.py` as a subprocess, killed with SIGKILL at random moments in mid-run (some time
    after a phase's checkpoint, before the last phase), then run again with --resume: the final
    results.json equals that of an uninterrupted run (accuracy matrix and memory). Real-weights
    options (--vit with a local timm file, --text-model with a BERT folder, both tiny and random)
    keep the CLI from pretraining its default towers."""
    import json
    import random
    import signal
    import time

    import timm
    from test_exmask import write_tiny_bert
    torch.save(timm.create_model("test_vit", num_classes=0).state_dict(), tmp_path / "vit.pth")
    write_tiny_bert(str(tmp_path / "bert"))
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "img")
    rows = []
    for c in range(8):                                # a colour per class, noise on top: learnable
        for i in range(12):
            img = np.clip(rng.normal(30 * c, 40, (160, 160, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "img" / f"{c}_{i}.png")
            rows.append((f"img/{c}_{i}.png", f"a photo of w{c} on the grass", f"c{c}", "test" if i >= 10 else "train"))
    D.write_csv(str(tmp_path / "m.csv"), ["image", "text", "label", "split"], rows)
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, EXMASK_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")

    def cli(out, *extra):
        return [sys.executable, os.path.join(here, "train.py"), "--data", str(tmp_path / "m.csv"), "--methods", "exmask",
                "--phases", "4", "--epochs", "2", "--batch-size", "8", "--memory-per-class", "2", "--no-export",
                "--vit", "test_vit", "--vit-file", str(tmp_path / "vit.pth"), "--text-model", str(tmp_path / "bert"),
                "--out", str(tmp_path / out), *extra]

    assert subprocess.run(cli("want"), env=env, capture_output=True).returncode == 0
    ck = tmp_path / "got" / "exmask" / "checkpoint.pt"
    rnd, killed = random.Random(0), []
    for _ in range(5):
        p = subprocess.Popen(cli("got", "--resume"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = ck.stat().st_mtime if ck.exists() else 0
        while p.poll() is None and (not ck.exists() or ck.stat().st_mtime == start):
            time.sleep(0.02)                                  # until the next phase's checkpoint
        time.sleep(rnd.uniform(0, 0.5))                       # then somewhere in the next phase
        if p.poll() is None:
            done = len(torch.load(ck, weights_only=True)["R"])
            p.send_signal(signal.SIGKILL)
            killed.append(done)
        p.wait()
    assert subprocess.run(cli("got", "--resume"), env=env, capture_output=True).returncode == 0
    want, got = (json.load(open(tmp_path / d / "results.json")) for d in ("want", "got"))
    assert sum(k < 4 for k in killed) >= 2, killed           # at least twice before the last phase
    assert got["accuracy_matrix"] == want["accuracy_matrix"] and got["memory"] == want["memory"]


@pytest.mark.parametrize("failure,says", [(lambda: OSError(errno.ENOSPC, "No space left on device"), "no space left"),
                                          (lambda: torch.cuda.OutOfMemoryError("CUDA out of memory"), "--batch-size 16")])
def test_a_full_disk_or_gpu_memory_is_one_line_and_exit_2(monkeypatch, capsys, failure, says):
    import train as T

    def fail(cfg):
        raise failure()

    monkeypatch.setattr(T, "train", fail)
    with pytest.raises(SystemExit) as e:
        T.main(["--batch-size", "32"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and says in err and len(err.splitlines()) == 1


def test_random_malformed_manifests_train_or_give_one_error_line(tmp_path):
    """Property: a manifest made of random rows (fields missing or empty, odd labels, splits, captions
    and bytes, images that are missing or not images, CSV or JSONL) either trains or ends in one
    `error:` line; never a traceback."""
    import json
    import tempfile
    from hypothesis import HealthCheck, given, settings, strategies as st
    import train as T
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "not-an-image.png").write_text("hello")
    cache = str(tmp_path / "cache")
    base = [{"image": "ok.png", "label": c, "text": f"a {c} thing", "split": s}
            for c in ("a", "b") for s in ("train", "train", "train", "test")]
    values = {"image": st.sampled_from(["missing.png", "not-an-image.png", ""]),
              "label": st.sampled_from(["", "c,d", "é \"x\"", "z"]),
              "text": st.text(max_size=12),
              "split": st.sampled_from(["", "val", "TEST", "Train", None])}
    change = st.tuples(st.integers(0, len(base) - 1), st.sampled_from(sorted(values))).flatmap(
        lambda t: st.tuples(st.just(t[0]), st.just(t[1]), values[t[1]] | st.just("<drop>")))

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(changes=st.lists(change, max_size=2), jsonl=st.booleans(), latin1=st.booleans(), phases=st.integers(1, 3))
    def check(changes, jsonl, latin1, phases):
        rows = [dict(r) for r in base]
        for i, k, v in changes:   # a field's value replaced, or the field dropped from a row
            if v == "<drop>" or v is None:
                rows[i].pop(k, None)
            else:
                rows[i][k] = v
        folder = tempfile.mkdtemp(dir=tmp_path)
        path = os.path.join(folder, "m.jsonl" if jsonl else "m.csv")
        for r in rows:
            if r.get("image"):
                r["image"] = os.path.join("..", r["image"])
        if jsonl:
            text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
        else:
            import io
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=sorted({k for r in rows for k in r}) or ["image"])
            w.writeheader()
            w.writerows(rows)
            text = buf.getvalue()
        with open(path, "wb") as f:
            f.write(text.encode("latin-1", errors="replace") if latin1 else text.encode("utf-8"))
        cfg = tiny_train_cfg(tmp_path, data=path, phases=phases, cache_dir=cache, out=os.path.join(folder, "out"))
        try:
            T.train(cfg)
            outcomes.append("trained")
        except SystemExit as e:
            assert isinstance(e.code, str) and e.code.startswith("error: ") and "\n" not in e.code, e.code
            outcomes.append(e.code.split(":")[1][:30])

    outcomes = []
    check()
    assert "trained" in outcomes and len(outcomes) > outcomes.count("trained")
