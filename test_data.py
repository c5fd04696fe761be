"""Tests of data at scale: the on-disk image cache, the lazy patch view, the fake-manifest generator."""
import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data as D
import models as M
import recipes as R


def tiny_manifest(folder, n: int = 10) -> str:
    """n small images of assorted sizes, modes and formats, and a CSV manifest naming them."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = ["image,text,label"]
    for i in range(n):
        px = rng.integers(0, 256, (12 + i, 20 - i % 5, 3), dtype=np.uint8)
        im = Image.fromarray(px)
        name = f"{i}." + ("png", "jpg", "bmp")[i % 3]
        (im.convert("L") if i % 4 == 3 else im).save(os.path.join(folder, name))
        lines.append(f"{name},caption {i},{'ab'[i % 2]}")
    path = os.path.join(folder, "m.csv")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def read(path, tmp_path, **kw):
    log = []
    d = D.read_manifest(path, 16, cache_dir=str(tmp_path / "cache"), log=log.append, **kw)
    return d, log


def cache_files(tmp_path) -> list[str]:
    return sorted(os.listdir(tmp_path / "cache" / "images"))


def want(path) -> torch.Tensor:
    rows = D.read_rows(path)
    return torch.stack([D.load_image(r["path"], 16) for r in rows])


def test_cache_round_trips_exactly_and_is_memory_mapped(tmp_path):
    path = tiny_manifest(tmp_path / "m")
    d, log = read(path, tmp_path)
    assert d["images"].dtype == torch.uint8 and d["images"].shape == (10, 3, 16, 16)
    assert torch.equal(d["images"], want(path))                       # the decode training and serving share
    assert len(log) == 1 and "building" in log[0]
    files = cache_files(tmp_path)
    assert [f.rsplit(".", 1)[1] for f in files] == ["json", "u8"]          # no temporary file left behind
    data_file = tmp_path / "cache" / "images" / files[1]
    assert data_file.read_bytes() == d["images"].numpy().tobytes()     # the tensor is the file's bytes
    assert not d["images"].numpy().flags.owndata                         # a view of the map, not a copy


def test_second_read_hits_the_cache_without_decoding(tmp_path, monkeypatch):
    path = tiny_manifest(tmp_path / "m")
    first, _ = read(path, tmp_path)

    def no_decode(*a, **k):
        raise AssertionError("decoded again")
    monkeypatch.setattr(D, "decode_image", no_decode)
    again, log = read(path, tmp_path)
    assert torch.equal(again["images"], first["images"]) and log == []


@pytest.mark.parametrize("damage", ["truncate", "row", "index", "no-index"])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, damage):
    path = tiny_manifest(tmp_path / "m")
    read(path, tmp_path)
    base = tmp_path / "cache" / "images" / cache_files(tmp_path)[0].rsplit(".", 1)[0]
    u8, index = base.with_suffix(".u8"), base.with_suffix(".json")
    if damage == "truncate":
        os.truncate(u8, u8.stat().st_size - 100)
    elif damage == "row":             # one byte of row 7
        raw = bytearray(u8.read_bytes())
        raw[7 * 3 * 16 * 16 + 5] ^= 0xFF
        u8.write_bytes(bytes(raw))
    elif damage == "index":
        index.write_text('{"version": 1, "shape": [10')
    else:
        index.unlink()
    d, log = read(path, tmp_path)
    reason = {"truncate": "bytes instead of", "row": "row 7 fails its checksum", "index": "unreadable",
              "no-index": "index is missing"}[damage]
    assert len(log) == 1 and reason in log[0] and "rebuilding" in log[0]
    assert torch.equal(d["images"], want(path))
    assert u8.stat().st_size == 10 * 3 * 16 * 16 and index.exists()
    assert read(path, tmp_path)[1] == []                                 # whole again: the next read hits


def test_a_killed_build_leaves_nothing_for_long(tmp_path):
    path = tiny_manifest(tmp_path / "m")
    read(path, tmp_path)
    base = tmp_path / "cache" / "images" / cache_files(tmp_path)[0].rsplit(".", 1)[0]
    base.with_suffix(".json").unlink()
    dead, alive = f"{base}.999999999-ab12cd34.u8", f"{base}.{os.getpid()}-ab12cd34.u8"   # no such pid / this one
    for f in (dead, alive):
        Path(f).write_bytes(b"half")
    read(path, tmp_path)
    assert not os.path.exists(dead) and os.path.exists(alive)


def test_an_edited_image_makes_the_cache_stale(tmp_path):
    path = tiny_manifest(tmp_path / "m")
    before, _ = read(path, tmp_path)
    img = tmp_path / "m" / "4.jpg"
    Image.new("RGB", (9, 9), (250, 10, 10)).save(img)
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))        # a coarse clock still sees the edit
    d, log = read(path, tmp_path)
    assert len(log) == 1 and "stale" in log[0]
    assert torch.equal(d["images"][4], D.load_image(str(img), 16)) and not torch.equal(d["images"][4], before["images"][4])
    assert torch.equal(d["images"][:4], before["images"][:4])
    assert len(cache_files(tmp_path)) == 2                              # replaced, not kept beside the old one


def test_an_edit_that_keeps_size_and_mtime_still_makes_the_cache_stale(tmp_path):
    """cp -p, rsync -a and tar x restore mtime; a same-size rewrite keeps the size: ctime still moves."""
    path = tiny_manifest(tmp_path / "m")
    before, _ = read(path, tmp_path)
    img = tmp_path / "m" / "5.bmp"                                   # BMP: the same size for other pixels
    st = img.stat()
    px = np.asarray(Image.open(img)).copy()
    Image.fromarray(255 - px).save(img)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert img.stat().st_size == st.st_size and img.stat().st_mtime_ns == st.st_mtime_ns
    d, log = read(path, tmp_path)
    assert len(log) == 1 and "stale" in log[0] and not torch.equal(d["images"][5], before["images"][5])


def test_decoding_turns_photos_upright_and_scales_16_bit_images(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 32), (32, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")                  # mode I;16: convert("RGB") clips to white
    g = D.decode_image(str(tmp_path / "g16.png"), 16)
    assert g.min() < 10 and g.max() > 245 and 100 < g.mean() < 155
    half = np.concatenate([np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 255, np.uint8)])   # black over white
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 3                                                   # EXIF orientation: rotated 180 degrees
    Image.fromarray(half).save(tmp_path / "rot.jpg", exif=exif)
    up = D.decode_image(str(tmp_path / "rot.jpg"), 16)
    assert up[:, :4].mean() > 200 and up[:, -4:].mean() < 50          # shown upright: white over black


def test_parallel_decode_equals_serial(tmp_path):
    path = tiny_manifest(tmp_path / "m", n=23)
    paths = [r["path"] for r in D.read_rows(path)]
    a, b = str(tmp_path / "a.u8"), str(tmp_path / "b.u8")
    seen = []
    crc_a = D.decode_images(paths, 16, a, workers=1)
    crc_b = D.decode_images(paths, 16, b, workers=2, progress=lambda done, total: seen.append((done, total)))
    assert Path(a).read_bytes() == Path(b).read_bytes() and crc_a == crc_b
    assert len(seen) > 2 and seen[-1] == (23, 23)                        # several chunks, all of them done
    assert np.fromfile(a, np.uint8).reshape(23, 3, 16, 16)[22].tobytes() == D.load_image(paths[22], 16).numpy().tobytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_image_is_one_error_line_naming_it(tmp_path, workers):
    path = tiny_manifest(tmp_path / "m")
    (tmp_path / "m" / "4.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(SystemExit) as e:
        read(path, tmp_path, workers=workers)
    msg = str(e.value)
    assert msg.startswith(f"error: cannot read image {tmp_path / 'm' / '4.jpg'}: ") and "\n" not in msg
    assert cache_files(tmp_path) == []                                   # nothing half-written is left
    (tmp_path / "m" / "4.jpg").unlink()
    with pytest.raises(SystemExit, match=r"^error: image not found: .*4\.jpg$"):
        read(path, tmp_path, workers=workers)


def test_prepare_cuts_patches_per_batch_as_patchify_of_everything(tmp_path):
    import train as T
    path = tiny_manifest(tmp_path / "m", n=12)
    cfg = T.Config(data=path, cache_dir=str(tmp_path / "cache"), quiet=True)
    raw = T.read_data(cfg, 16)
    mcfg = M.ModelConfig(vit=M.ViTConfig(image_size=16, patch_size=4))
    tok = D.SPTokenizer.train(raw["texts"], 100)
    data = T.prepare(raw, cfg, mcfg, tok)
    full = M.patchify(raw["images"], 4)                                  # (12, 16, 48)
    view = data["patches"]
    assert view.shape == full.shape and len(view) == 12 and view.shape[-1] == 48
    assert view.images is raw["images"]                                  # no copy of the images per seed
    idx = torch.tensor([9, 2, 2, 11, 0, 5])                              # unsorted, with a repeat
    assert view[idx].dtype == torch.uint8 and torch.equal(view[idx], full[idx])
    assert torch.equal(view[[3, 1]], full[[3, 1]]) and torch.equal(view[7], full[7])
    assert torch.equal(view[raw["is_test"]], full[raw["is_test"]]) and view[torch.tensor([], dtype=torch.long)].shape == (0, 16, 48)


def test_fake_manifest_generator(tmp_path):
    path = R.make_fake(str(tmp_path / "f"), 12, size=32, classes=3, workers=2, log=lambda *a: None)
    rows = list(csv.DictReader(Path(path).read_text().splitlines()))
    assert len(rows) == 12 and {r["label"] for r in rows} <= {"class000", "class001", "class002"}
    with Image.open(tmp_path / "f" / rows[0]["image"]) as im:
        assert im.format == "JPEG" and im.size == (32, 32)
    again = R.make_fake(str(tmp_path / "g"), 12, size=32, classes=3, workers=1, log=lambda *a: None)
    assert Path(again).read_text() == Path(path).read_text()                       # seeded, whatever the workers
    assert all((tmp_path / "g" / r["image"]).read_bytes() == (tmp_path / "f" / r["image"]).read_bytes() for r in rows)
    d = D.read_manifest(path, 32, cache_dir=str(tmp_path / "cache"), log=lambda *a: None)
    assert d["images"].shape == (12, 3, 32, 32) and d["images"].float().std() > 10   # not blank images


def test_fake_cli(tmp_path):
    """The documented command, `python data.py fake` (data.py hands it to recipes.py)."""
    import subprocess
    import sys
    subprocess.run([sys.executable, "data.py", "fake", str(tmp_path / "f"), "--n", "5", "--size", "24", "--classes", "2",
                    "--workers", "1"], cwd=os.path.dirname(os.path.abspath(__file__)), check=True, capture_output=True)
    rows = list(csv.DictReader((tmp_path / "f" / "manifest.csv").read_text().splitlines()))
    assert len(rows) == 5 and all((tmp_path / "f" / r["image"]).exists() for r in rows)


def test_bench_data_scale_measures_a_cold_and_a_warm_start(tmp_path):
    import json

    import bench
    out = str(tmp_path / "bench.json")
    bench.main(["--only", "data_scale", "--sizes", "6", "--scale-dir", str(tmp_path / "scale"), "--threads", "1",
                "--out", out])
    row = json.loads(Path(out).read_text())["results"]["data_scale"]["rows"][0]
    cold, warm = row["cold"], row["warm"]
    assert row["images"] == 6 and os.path.exists(tmp_path / "scale" / "fake-6" / "manifest.csv")
    assert not cold["cache_existed"] and warm["cache_existed"]                 # built once, then hit
    assert cold["cache_gib"] == pytest.approx(6 * 3 * 224 * 224 / 2 ** 30)
    for r in (cold, warm):
        assert 0 < r["startup_s"] < r["process_s"] and r["batch32_ms"] > 0 and r["startup_cpu_s"] > 0
        assert 0 < r["peak_anon_mib"] <= r["peak_pss_mib"] and r["peak_rss_mib"] > 0


def test_data_startup_measures_start_up_then_training_steps(tmp_path):
    import bench_data
    path = tiny_manifest(tmp_path / "m", n=8)
    r = bench_data.data_startup(path, str(tmp_path / "cache"), 1, steps=2, image_size=32, patch=8, dims=(32, 1, 2))
    assert not r["cache_existed"] and r["images"] == 8 and r["cache_gib"] == pytest.approx(8 * 3 * 32 * 32 / 2 ** 30)
    assert r["train_steps"] == 2 and r["train_step_s"] > 0
    assert 0 < r["startup_peak_anon_mib"] <= r["peak_anon_mib"] <= r["peak_pss_mib"]
    assert bench_data.data_startup(path, str(tmp_path / "cache"), 1, image_size=32, patch=8, dims=(32, 1, 2))["cache_existed"]


def test_manifest_header_spaces_label_spaces_and_jsonl_errors(tmp_path):
    """A header written "image, text, label" is read; " cat" and "cat" are one class; a .JSONL file
    in capitals is JSONL; a broken JSONL row is named by its line in the file (blank lines counted)."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("image, text, label\na.png,one, cat\na.png,two,cat\n")
    rows = D.read_rows(str(tmp_path / "m.csv"))
    assert {r["label"] for r in rows} == {"cat"} and rows[0]["text"] == "one"
    (tmp_path / "M.JSONL").write_text('{"image": "a.png", "text": "x", "label": "cat"}\n')
    assert D.read_rows(str(tmp_path / "M.JSONL"))[0]["label"] == "cat"
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "text": "x", "label": "cat"}\n\n{"image": "a.png",\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl line 3: "):
        D.read_rows(str(tmp_path / "bad.jsonl"))
