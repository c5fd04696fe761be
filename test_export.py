"""Tests for export.py: ONNX export of a tiny trained run, ORT vs PyTorch parity, dynamic axes,
the Predictor and CLI, and bad input. CPU-only; one tiny run is trained and exported per module."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import data as D
import export as E
import models as M

HERE = os.path.dirname(os.path.abspath(__file__))
SYNTH = D.SynthConfig(n_classes=4, train_per_class=6, test_per_class=3)
TINY = M.ModelConfig(vit=M.ViTConfig(dim=32, depth=2, heads=2, embed_dim=32),
                     text=M.TextConfig(dim=32, depth=1, heads=2, embed_dim=32))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A tiny trained replay run (2 phases, 4 classes), exported once; plus a few test images as
    PNG files and a manifest."""
    from towers import PretrainConfig
    from train import Config, train
    tmp = tmp_path_factory.mktemp("run")
    train(Config(methods="replay", phases=2, epochs=1, out=str(tmp), quiet=True, export=False, synth=SYNTH,
                 model=TINY, pretrain=PretrainConfig(classes=8, per_class=4, epochs=1, batch_size=16),
                 cache_dir=str(tmp / "cache")))
    folder = str(tmp / "replay")
    path = E.export_run(folder)
    ds = D.make_synth(SYNTH)
    test = ds["is_test"].nonzero().flatten()
    rows = []
    for k, i in enumerate(test[:5].tolist()):
        Image.fromarray(ds["images"][i].permute(1, 2, 0).numpy()).save(tmp / f"img{k}.png")
        rows.append({"image": f"img{k}.png", "text": ds["texts"][i], "label": ds["class_names"][ds["labels"][i]]})
    with open(tmp / "rows.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "text", "label"])
        w.writeheader()
        w.writerows(rows)
    with open(tmp / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return {"dir": folder, "onnx": path, "tmp": tmp, "ds": ds, "test": test, "rows": rows}


def unmerged(folder: str) -> M.TwoTower:
    """The trained model exactly as train.py left it: SSF adapters still separate modules."""
    ck = torch.load(os.path.join(folder, "model.pt"), weights_only=True)
    model = M.TwoTower(M.ModelConfig.from_dict(ck["model_config"]), n_classes=len(ck["class_names"]))
    model.load_state_dict(ck["state"])
    return model.eval()


# ----------------------------------------------------------------------------- the file

def test_export_is_one_clean_file(run):
    folder = run["dir"]
    assert run["onnx"] == os.path.join(folder, "model.onnx")
    assert sorted(f for f in os.listdir(folder) if "onnx" in f or ".tmp" in f or f.endswith(".data")) == ["model.onnx"]
    assert os.path.exists(os.path.join(folder, "tokenizer.model"))
    with open(os.path.join(folder, "labels.json")) as f:
        assert len(json.load(f)) == SYNTH.n_classes
    m = onnx.load(run["onnx"], load_external_data=False)
    onnx.checker.check_model(m)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    assert isinstance(dims["images"][0], str) and dims["images"][1:] == [3, 32, 32]
    assert all(isinstance(d, str) for d in dims["ids"]) and dims["ids"][0] == dims["images"][0]
    ops = {n.op_type for n in m.graph.node}
    assert not ops & {"Dropout", "BatchNormalization", "RandomNormal", "RandomUniform"}
    assert not [t.name for t in m.graph.initializer if "_ssf" in t.name]   # adapters folded away
    assert all(not n.metadata_props for n in m.graph.node)                 # no local stack traces
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["exmask.context"] == str(TINY.text.context) and meta["exmask.n_classes"] == str(SYNTH.n_classes)


# ----------------------------------------------------------------------------- parity

def test_parity_on_test_split(run):
    """ORT vs the trained PyTorch model (SSF unmerged, as trained) on every test sample."""
    model = unmerged(run["dir"])
    ssf = [v for k, v in model.state_dict().items() if k.endswith("_ssf.scale")]
    assert max((s - 1).abs().max().item() for s in ssf) > 1e-4   # training moved SSF: merging is not a no-op
    pred = E.Predictor(run["dir"], providers=["CPUExecutionProvider"])
    ds, test = run["ds"], run["test"]
    images, ids = pred.inputs(list(ds["images"][test]), [ds["texts"][i] for i in test])
    r = E.compare(model, pred.session, images, ids)
    assert r["n"] == len(test) == SYNTH.n_classes * SYNTH.test_per_class
    assert r["max_abs_diff"] <= 1e-4
    assert r["top1_agree"] == 1.0


@pytest.mark.parametrize("batch,length", [(1, 24), (5, 7), (7, 1)])
def test_dynamic_axes(run, batch, length):
    """Batch sizes and caption lengths other than the traced (2, context)."""
    model, _ = E.load_model(run["dir"])
    sess = E.session(run["onnx"], providers=["CPUExecutionProvider"])
    r = E.compare(model, sess, *E.example_inputs(model, batch, length, seed=batch))
    assert r["n"] == batch and r["max_abs_diff"] <= 1e-4 and r["top1_agree"] == 1.0


def test_trimmed_captions_give_the_same_logits(run):
    """The Predictor cuts ids to the batch's longest caption; padding up to the context changes nothing."""
    pred = E.Predictor(run["dir"])
    ds, test = run["ds"], run["test"][:6]
    images, ids = pred.inputs(list(ds["images"][test]), [ds["texts"][i] for i in test])
    assert ids.shape[1] < pred.context
    full = torch.full((len(ids), pred.context), pred.pad_id)
    full[:, :ids.shape[1]] = ids
    a = pred.session.run(["logits"], {"images": images.numpy(), "ids": ids.numpy()})[0]
    b = pred.session.run(["logits"], {"images": images.numpy(), "ids": full.numpy()})[0]
    np.testing.assert_allclose(a, b, atol=1e-5)


def padded_ids(model: M.TwoTower, lengths: list[int], width: int, seed: int = 0) -> torch.Tensor:
    """(len(lengths), width) ids: row i holds lengths[i] tokens (no pad among them), then pads."""
    tc = model.cfg.text
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, tc.vocab_size, (len(lengths), width), generator=g)
    ids[ids == tc.pad_id] = (tc.pad_id + 1) % tc.vocab_size
    for i, n in enumerate(lengths):
        ids[i, n:] = tc.pad_id
    return ids


@pytest.mark.parametrize("lengths,width", [([3], 24), ([1], 9), ([24, 1, 5, 12, 2], 24), ([7, 3, 1], 7)])
def test_parity_padded_captions(run, lengths, width):
    """Captions of different lengths padded to one width (the pad mask, i.e. MultiHeadAttention's
    key_padding_mask), batch 1 included: ORT agrees with PyTorch."""
    model, _ = E.load_model(run["dir"])
    sess = E.session(run["onnx"], providers=["CPUExecutionProvider"])
    images, _ = E.example_inputs(model, len(lengths), 1, seed=len(lengths))
    r = E.compare(model, sess, images, padded_ids(model, lengths, width, seed=width))
    assert r["max_abs_diff"] <= 1e-4 and r["top1_agree"] == 1.0


def mha_nodes(m: onnx.ModelProto) -> list:
    return [n for n in m.graph.node if n.domain == E.MS_DOMAIN and n.op_type == "MultiHeadAttention"]


def test_export_uses_fused_attention(run):
    """The default export runs every attention as ORT's com.microsoft.MultiHeadAttention: one per
    block, the text tower's with the pad mask as key_padding_mask, and no Softmax left."""
    m = onnx.load(run["onnx"])
    nodes = mha_nodes(m)
    assert len(nodes) == TINY.vit.depth + TINY.text.depth
    with_mask = [n for n in nodes if len(n.input) > 4 and n.input[4]]
    assert len(with_mask) == TINY.text.depth
    assert all({a.name: a.i for a in n.attribute}["num_heads"] == 2 for n in nodes)
    assert not [n for n in m.graph.node if n.op_type in ("Softmax", "MatMul")]
    assert {o.domain: o.version for o in m.opset_import}[E.MS_DOMAIN] == 1


def test_portable_export_has_standard_ops_only(run, tmp_path, capsys):
    """`--exporter portable`: the same model, standard ONNX ops only (for runtimes other than ORT)."""
    for f in ("model.pt", "tokenizer.model"):
        shutil.copy(os.path.join(run["dir"], f), tmp_path / f)
    E.main([str(tmp_path), "--exporter", "portable"])
    assert "max |diff|" in capsys.readouterr().out
    model, _ = E.load_model(run["dir"])
    path = str(tmp_path / "model.onnx")
    m = onnx.load(path)
    onnx.checker.check_model(m)    # only standard ops: the checker knows them all
    assert not mha_nodes(m) and {n.domain for n in m.graph.node} <= {"", "ai.onnx"}
    images, _ = E.example_inputs(model, 3, 1)
    r = E.compare(model, E.session(path), images, padded_ids(model, [9, 1, 4], 9))
    assert r["max_abs_diff"] <= 1e-4 and r["top1_agree"] == 1.0


def test_fused_rewrite_is_exact_and_undone(run):
    """ort_fused only changes the graph: eager outputs stay, and the model is as before on leaving,
    also when the export inside fails."""
    model, _ = E.load_model(run["dir"])
    keys = list(model.state_dict())
    images, ids = E.example_inputs(model, 4, 11, seed=4)
    with torch.no_grad():
        ref = model(images, ids)
        with E.ort_fused(model):
            assert "forward" in model.text.blocks[0].attn.__dict__
            fused = model(images, ids)
        np.testing.assert_allclose(fused.numpy(), ref.numpy(), atol=1e-5)
        with pytest.raises(RuntimeError), E.ort_fused(model):
            raise RuntimeError("export failed")
        assert torch.equal(model(images, ids), ref)
    assert list(model.state_dict()) == keys
    assert not [m for m in model.modules() if "forward" in m.__dict__ or any(b.startswith("ort_") for b in m._buffers)]


def test_prompt_adapter_fused_export(tmp_path):
    """Prompt adapters with open gates, both towers: a second MultiHeadAttention per block over the
    prompts (no pad mask), the gate folded into the prompts' values; ORT agrees with PyTorch."""
    torch.manual_seed(0)
    model = M.TwoTower(M.ModelConfig(vit=TINY.vit, text=TINY.text, adapter="prompt"), n_classes=3).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, M.Attention):
                m.prompt_gate.uniform_(-1, 1)
                m.prompt.normal_()
    path = str(tmp_path / "m.onnx")
    E.export_onnx(model, path)
    nodes = mha_nodes(onnx.load(path))
    assert len(nodes) == 2 * (TINY.vit.depth + TINY.text.depth)
    assert len([n for n in nodes if len(n.input) > 4 and n.input[4]]) == TINY.text.depth
    sess = E.session(path)
    for lengths in ([4], [24, 1, 6]):
        images, _ = E.example_inputs(model, len(lengths), 1, seed=len(lengths))
        r = E.compare(model, sess, images, padded_ids(model, lengths, 24))
        assert r["max_abs_diff"] <= 1e-4 and r["top1_agree"] == 1.0


@pytest.mark.parametrize("dynamo", [True, False])
def test_prompt_adapter_and_single_modality_export(tmp_path, dynamo):
    """Prompt adapters stay in the graph (nothing to merge); an image-only model still exports;
    both exporters give dynamic axes."""
    torch.manual_seed(0)
    cfg = M.ModelConfig(vit=TINY.vit, text=TINY.text, adapter="prompt", modalities="image")
    model = M.TwoTower(cfg, n_classes=3).eval()
    with torch.no_grad():
        for blk in model.image.blocks:
            blk.attn.prompt_gate.fill_(0.5)   # open the gates, so the prompts change the output
    path = str(tmp_path / "m.onnx")
    E.export_onnx(model, path, dynamo=dynamo)
    assert onnx.load(path).metadata_props[0].key.startswith("exmask.")
    r = E.compare(model, E.session(path), *E.example_inputs(model, 4, 5))
    assert r["max_abs_diff"] <= 1e-4 and r["top1_agree"] == 1.0


# ----------------------------------------------------------------------------- Predictor and CLI

def test_predictor_paths_and_tensors_agree(run):
    pred = E.Predictor(run["dir"])
    assert pred.providers[-1] == "CPUExecutionProvider"                      # CUDA's first where a GPU is
    assert ("CUDAExecutionProvider" in pred.providers) == E.gpu_present()
    rows, tmp = run["rows"], run["tmp"]
    paths = [str(tmp / r["image"]) for r in rows]
    tensors = [D.load_image(p, 32) for p in paths]
    caps = [r["text"] for r in rows]
    top = pred.predict(paths, caps, top_k=3)
    assert len(top) == len(rows) and all(len(t) == 3 for t in top)
    assert all(name in pred.labels for t in top for name, _ in t)
    assert all(t[0][1] >= t[1][1] >= t[2][1] > 0 for t in top)
    np.testing.assert_allclose(pred.logits(paths, caps), pred.logits(tensors, caps), atol=1e-6)
    p = E.softmax(pred.logits(paths, caps))
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)


def test_cli_predict(run, capsys):
    r = run["rows"][0]
    E.main([run["dir"], "--predict", str(run["tmp"] / r["image"]), r["text"], "--top-k", "3"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3 and out[0].startswith("1. ")
    name, prob = out[0][3:].split()
    assert name in run["ds"]["class_names"] and 0 < float(prob) <= 1


@pytest.mark.parametrize("ext", ["csv", "jsonl"])
def test_cli_manifest(run, capsys, ext):
    E.main([run["dir"], "--manifest", str(run["tmp"] / f"rows.{ext}"), "--top-k", "2", "--batch-size", "2"])
    cap = capsys.readouterr()
    lines = cap.out.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == [r["image"] for r in run["rows"]]
    assert all(len(ln.split("\t")) == 3 for ln in lines)
    assert "top-1 accuracy on 5 labelled rows" in cap.err


def test_cli_check(run, capsys):
    E.main([run["dir"], "--manifest", str(run["tmp"] / "rows.csv"), "--check"])
    assert "top-1 agreement 100.0%" in capsys.readouterr().out


def test_long_caption_is_truncated_with_a_note(run, capsys):
    long = " ".join(["grass"] * 200)
    img = str(run["tmp"] / run["rows"][0]["image"])
    E.main([run["dir"], "--predict", img, long])
    cap = capsys.readouterr()
    assert "truncated" in cap.err and len(cap.out.strip().splitlines()) == SYNTH.n_classes   # top-5 of 4 classes
    pred = E.Predictor(run["dir"])
    _, ids = pred.inputs([img], [long])
    assert ids.shape[1] == pred.context and ids[0, -1].item() == pred.tok.eos_id


# ----------------------------------------------------------------------------- bad input

def _error(argv) -> str:
    with pytest.raises(SystemExit) as e:
        E.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error:") and "\n" not in msg   # a string code: Python exits with status 1
    return msg


def test_missing_image(run):
    assert "not found" in _error([run["dir"], "--predict", str(run["tmp"] / "nope.png"), "a caption"])


def test_unreadable_image(run, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert "cannot read image" in _error([run["dir"], "--predict", str(bad), "a caption"])


def test_empty_caption(run):
    assert "empty caption" in _error([run["dir"], "--predict", str(run["tmp"] / "img0.png"), "   "])


def test_missing_image_in_manifest(run, tmp_path):
    (tmp_path / "m.csv").write_text("image,text\nnope.png,a caption\n")
    assert "not found" in _error([run["dir"], "--manifest", str(tmp_path / "m.csv")])


def test_no_trained_model(tmp_path):
    assert "no trained model" in _error([str(tmp_path)])
    assert "no trained model" in _error([str(tmp_path / "missing"), "--predict", "x.png", "a caption"])
    assert not os.listdir(tmp_path)


def test_failed_export_leaves_no_partial_file(run, tmp_path, monkeypatch):
    """A save that dies halfway leaves the old model.onnx untouched and no temporary file."""
    model, _ = E.load_model(run["dir"])
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous model")

    def dies_halfway(tmp, **kw):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")
    prog = SimpleNamespace(model=SimpleNamespace(graph=SimpleNamespace(all_nodes=lambda: []), metadata_props={}),
                           save=dies_halfway)
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **kw: prog)
    with pytest.raises(SystemExit, match="^error: ONNX export .* failed: OSError: disk full"):
        E.export_onnx(model, str(path))
    assert path.read_bytes() == b"previous model" and os.listdir(tmp_path) == ["model.onnx"]


def test_failed_parity_keeps_the_last_good_export(run, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir()
    for f in ("model.pt", "tokenizer.model", "labels.json"):
        (folder / f).write_bytes(open(os.path.join(run["dir"], f), "rb").read())
    monkeypatch.setattr(E, "session", lambda *a, **kw: None)
    monkeypatch.setattr(E, "compare", lambda *a: {"max_abs_diff": 1.0, "top1_agree": 0.5, "n": 3})
    # the real exporter is tested above; here only what happens after a bad parity check
    monkeypatch.setattr(E, "export_onnx", lambda model, path, dynamo, fused: open(path, "wb").close())
    (folder / "model.onnx").write_bytes(b"the last good export")
    with pytest.raises(SystemExit, match="^error: ONNX Runtime disagrees"):
        E.export_run(str(folder))
    assert (folder / "model.onnx").read_bytes() == b"the last good export"
    assert sorted(os.listdir(folder)) == ["labels.json", "model.onnx", "model.pt", "tokenizer.model"]


def test_subprocess_exit_codes_and_clean_stderr(run):
    """The real process: status 0 and no warning lines on a CPU-only machine; status 1 and one
    'error:' line (no traceback) on bad input."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    img = str(run["tmp"] / "img0.png")
    ok = subprocess.run([sys.executable, "export.py", run["dir"], "--predict", img, "a caption"],
                        cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr.strip().splitlines() == ["providers: CPUExecutionProvider"]
    bad = subprocess.run([sys.executable, "export.py", run["dir"], "--predict", img + ".missing", "a caption"],
                         cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()    # the error alone: the providers are said only once rows are served
    assert len(lines) == 1 and lines[0].startswith("error: image not found"), lines


def test_serving_options_cpu_threads_and_batch_size(run, capsys, monkeypatch):
    """--cpu keeps ORT on the CPU provider, --threads sets its intra-op threads, --batch-size how many
    rows a call serves."""
    pred = E.Predictor(run["dir"], providers=["CPUExecutionProvider"], threads=1)
    assert pred.session.get_session_options().intra_op_num_threads == 1
    made, real = [], E.Predictor
    monkeypatch.setattr(E, "Predictor", lambda folder, providers=None, threads=0: (made.append((providers, threads)),
                                                                                  real(folder, providers, threads))[1])
    served, real_predict = [], real.predict
    monkeypatch.setattr(real, "predict", lambda self, imgs, caps, k: (served.append(len(imgs)), real_predict(self, imgs, caps, k))[1])
    E.main([run["dir"], "--manifest", str(run["tmp"] / "rows.csv"), "--cpu", "--threads", "1", "--batch-size", "2"])
    assert made == [(["CPUExecutionProvider"], 1)] and served == [2, 2, 1]
    assert "providers: CPUExecutionProvider" in capsys.readouterr().err


def test_damaged_serving_files_are_one_error_line(run, tmp_path):
    """A truncated model.onnx, another program's ONNX file, a damaged labels.json or tokenizer, and a
    --batch-size below 1: each one `error:` line saying what, never a traceback."""
    import shutil
    import onnx

    def fresh() -> str:
        folder = tmp_path / "copy"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(run["dir"], folder)
        return str(folder)

    def error(fn, *a) -> str:
        with pytest.raises(SystemExit) as e:
            fn(*a)
        assert isinstance(e.value.code, str) and e.value.code.startswith("error: ") and "\n" not in e.value.code
        return e.value.code

    folder = fresh()
    data = open(os.path.join(folder, "model.onnx"), "rb").read()
    open(os.path.join(folder, "model.onnx"), "wb").write(data[: len(data) // 3])
    assert "write it again" in error(E.Predictor, folder)
    folder = fresh()
    m = onnx.load(os.path.join(folder, "model.onnx"))
    del m.metadata_props[:]                                        # a model export.py did not write
    onnx.save(m, os.path.join(folder, "model.onnx"))
    assert "metadata" in error(E.Predictor, folder)
    folder = fresh()
    open(os.path.join(folder, "labels.json"), "w").write('["a", "b"')
    assert "labels.json" in error(E.Predictor, folder)
    folder = fresh()
    open(os.path.join(folder, "tokenizer.model"), "wb").write(b"not a sentencepiece model")
    assert "cannot read tokenizer" in error(E.Predictor, folder)
    assert "--batch-size" in error(E.main, [run["dir"], "--predict", str(run["tmp"] / "img0.png"), "a", "--batch-size", "0"])


# ----------------------------------------------------------------------------- bench.py

def test_bench_onnx_latency_smoke(run, tmp_path):
    """bench.py runs on a trained run folder, merges into an existing JSON, and ORT agrees with torch."""
    import bench
    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"results": {"other": {"kept": True}}}))
    threads = torch.get_num_threads()
    try:
        bench.main(["--only", "onnx_latency", "--run", run["dir"], "--repeats", "2", "--warmup", "1",
                    "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    rep = json.loads(out.read_text())
    assert rep["results"]["other"] == {"kept": True} and rep["machine"]["cores"] == os.cpu_count()
    res = rep["results"]["onnx_latency"]
    assert res["torch_threads"] == res["ort_intra_op_threads"] == 1
    assert [r["batch"] for r in res["rows"]] == [1, 32]
    assert all(r["torch_ms"] > 0 and r["ort_dynamo_all_ms"] > 0 and r["ort_portable_all_ms"] > 0
               and r["max_abs_diff"] <= 1e-4 for r in res["rows"])


def test_a_model_file_failing_without_a_message_is_one_error_line(tmp_path, monkeypatch):
    """An exception with an empty message (e.g. EOFError() from a truncated file) still gives the one
    error line, not an IndexError from taking its first line."""
    import export as E
    (tmp_path / "model.pt").write_bytes(b"")

    def fail(*a, **k):
        raise EOFError()
    monkeypatch.setattr(E.torch, "load", fail)
    with pytest.raises(SystemExit, match=r"^error: cannot load .*model.pt: EOFError: $"):
        E.load_model(str(tmp_path))
