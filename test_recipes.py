"""Tests of the paper's benchmarks as manifests (python data.py food101 | imagenet-r, recipes.py) on tiny
fake trees in their published layouts, and of a protocol's memory counted without training
(python data.py budget). CPU only; nothing is downloaded. Run: python -m pytest -q test_recipes.py"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data as D
import exmask
import recipes as R

HERE = os.path.dirname(os.path.abspath(__file__))
QUIET = {"log": lambda *a: None, "workers": 1}


def jpeg(path, seed: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    px = np.random.default_rng(seed).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(px).save(path, quality=90)


def corrupt(path) -> None:
    """A JPEG cut in half, as an interrupted download leaves it."""
    jpeg(path, 99)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:len(data) // 2])


def rows_of(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- UPMC Food-101

TRICKY = {   # (split, file) -> the title as the manifest must hold it
    ("train", "apple_pie_0.jpg"): 'Grandma\'s "best" apple pie, with cinnamon',
    ("train", "apple_pie_1.jpg"): "Crème brûlée pie — 日本語のレシピ",
    ("train", "apple_pie_2.jpg"): "Pie, unquoted, commas",
    ("train", "ramen_0.jpg"): "line one line two",
}


def food101_tree(root) -> None:
    """3 classes, 3 train + 2 test images each, in ViLT's layout: one corrupt image, one image with no
    title row, stray files, titles with quotes, commas (quoted and not), non-ASCII and a line break,
    and title rows that point at nothing, repeat a file, or are blank."""
    root = str(root)
    lines = {"train": [], "test": []}
    for c, cls in enumerate(("apple_pie", "bibimbap", "ramen")):
        for split, ks in (("train", range(3)), ("test", range(3, 5))):
            for k in ks:
                f = f"{cls}_{k}.jpg"
                jpeg(os.path.join(root, "images", split, cls, f), 10 * c + k)
                lines[split].append(f"{f},{cls} recipe number {k},{cls}")
    lines["train"][0] = 'apple_pie_0.jpg,"Grandma\'s ""best"" apple pie, with cinnamon",apple_pie'
    lines["train"][1] = "apple_pie_1.jpg,Crème brûlée pie — 日本語のレシピ,apple_pie"
    lines["train"][2] = "apple_pie_2.jpg,Pie, unquoted, commas,apple_pie"
    lines["train"][6] = 'ramen_0.jpg,"line one\nline two",ramen'
    lines["train"] += ["", "apple_pie_9.jpg,an image that is not there,apple_pie", "bibimbap_0.jpg,again,bibimbap"]
    corrupt(os.path.join(root, "images", "test", "ramen", "ramen_4.jpg"))
    jpeg(os.path.join(root, "images", "test", "ramen", "ramen_8.jpg"), 7)              # no title row
    for stray in ("images/train/.DS_Store", "images/train/apple_pie/._apple_pie_0.jpg", "images/test/notes.txt"):
        Path(root, stray).write_bytes(b"\0\1 not an image")
    os.makedirs(os.path.join(root, "texts"), exist_ok=True)
    for split, ls in lines.items():
        Path(root, "texts", f"{split}_titles.csv").write_text("\n".join(ls) + "\n", encoding="utf-8")


def test_food101_manifest_has_the_official_split_and_every_title_whole(tmp_path):
    food101_tree(tmp_path / "food")
    log = []
    path = R.build_food101(str(tmp_path / "food"), str(tmp_path / "out"), log=log.append, workers=2)
    rows = rows_of(path)
    assert list(rows[0]) == ["image", "text", "label", "split"]
    assert len(rows) == 14                                            # 15 titled images, one corrupt
    assert sum(r["split"] == "train" for r in rows) == 9 and sum(r["split"] == "test" for r in rows) == 5
    assert {r["label"] for r in rows} == {"apple_pie", "bibimbap", "ramen"}
    by_file = {(r["split"], os.path.basename(r["image"])): r for r in rows}
    for key, title in TRICKY.items():
        assert by_file[key]["text"] == title
    assert ("test", "ramen_4.jpg") not in by_file and ("test", "ramen_8.jpg") not in by_file
    assert by_file[("train", "bibimbap_0.jpg")]["text"] == "bibimbap recipe number 0"        # the first row wins
    for r in rows:                                                    # each row's image is its class's own file
        assert (tmp_path / "out" / r["image"]).is_file() and os.path.basename(r["image"]).startswith(r["label"])
        assert f"/images/{r['split']}/{r['label']}/" in r["image"]
    why = {os.path.basename(r["path"]): r["reason"] for r in rows_of(tmp_path / "out" / "skipped.csv")}
    assert set(why) == {"ramen_4.jpg", "ramen_8.jpg", "apple_pie_9.jpg", "train_titles.csv line 13"}
    assert "truncated" in why["ramen_4.jpg"].lower() and why["ramen_8.jpg"] == "no title row"
    assert len(log) == 1 and "14 images of 3 classes (9 train, 5 test); skipped 4" in log[0]
    assert "stray files ignored: 3" in log[0] and "unreadable images: 1" in log[0]
    # what train.py does with it: the checks, then the images into the cache
    _, names, _, is_test = D.manifest_table(path)
    assert names == ["apple_pie", "bibimbap", "ramen"] and int(is_test.sum()) == 5
    d = D.read_manifest(path, 16, cache_dir=str(tmp_path / "cache"), log=lambda *a: None)
    assert d["images"].shape == (14, 3, 16, 16) and d["texts"] == [r["text"] for r in rows]


def test_food101_refuses_a_tree_in_another_layout(tmp_path):
    food101_tree(tmp_path / "food")
    os.remove(tmp_path / "food" / "texts" / "test_titles.csv")
    with pytest.raises(SystemExit, match="test_titles.csv is missing"):
        R.build_food101(str(tmp_path / "food"), str(tmp_path / "out"), **QUIET)


def test_food101_cli(tmp_path):
    """The documented command, `python data.py food101 ROOT OUT` (data.py hands it to recipes.py)."""
    food101_tree(tmp_path / "food")
    run = subprocess.run([sys.executable, "data.py", "food101", str(tmp_path / "food"), str(tmp_path / "out"),
                          "--workers", "1"], cwd=HERE, check=True, capture_output=True, text=True)
    assert len(rows_of(tmp_path / "out" / "manifest.csv")) == 14 and "skipped 4" in run.stdout


# ----------------------------------------------------------------------------- ImageNet-R

WNIDS = {"n01443537": "goldfish", "n01484850": "great white shark", "n02085620": "Chihuahua"}


def imagenet_r_tree(root, per_class: int = 10) -> None:
    """3 ImageNet-R classes of `per_class` images over a few renditions, one corrupt image, stray
    files and folders."""
    for c, wnid in enumerate(WNIDS):
        for k in range(per_class):
            rendition = ("art", "sketch", "origami", "misc")[k % 4]
            jpeg(os.path.join(root, "imagenet-r", wnid, f"{rendition}_{k}.jpg"), 100 * c + k)
    corrupt(os.path.join(root, "imagenet-r", "n02085620", "toy_50.jpg"))
    Path(root, "imagenet-r", "README.txt").write_text("ImageNet-R")
    Path(root, "imagenet-r", "n01443537", ".DS_Store").write_bytes(b"\0")
    os.makedirs(os.path.join(root, "imagenet-r", "__MACOSX"))


def test_imagenet_r_manifest_seeded_80_20_split_names_and_template_captions(tmp_path):
    imagenet_r_tree(tmp_path / "in")
    log = []
    path = R.build_imagenet_r(str(tmp_path / "in"), str(tmp_path / "out"), log=log.append, workers=2)
    rows = rows_of(path)
    assert list(rows[0]) == ["image", "text", "label", "split", "text_source"]
    assert len(rows) == 30 and {r["label"] for r in rows} == set(WNIDS.values())       # names from the wnids
    for name in WNIDS.values():                                       # 80/20 in every class
        assert sum(r["split"] == "test" for r in rows if r["label"] == name) == 2
    by_file = {r["image"].split("imagenet-r/")[1]: r for r in rows}
    assert by_file["n01443537/sketch_1.jpg"]["text"] == "a sketch of a goldfish"
    assert by_file["n01443537/art_0.jpg"]["text"] == "an artwork of a goldfish"
    assert by_file["n02085620/origami_2.jpg"]["text"] == "an origami of a Chihuahua"
    assert by_file["n01484850/misc_3.jpg"]["text"] == "a picture of a great white shark"
    assert {r["text_source"] for r in rows} == {"template"}
    assert "n02085620/toy_50.jpg" not in by_file
    assert "skipped 1" in log[0] and "template captions: 30" in log[0] and "stray files ignored: 3" in log[0]
    assert all((tmp_path / "out" / r["image"]).is_file() for r in rows)
    again = R.build_imagenet_r(str(tmp_path / "in" / "imagenet-r"), str(tmp_path / "again"), **QUIET)   # ROOT may
    assert [r["split"] for r in rows_of(again)] == [r["split"] for r in rows]                          # be the folder
    other = rows_of(R.build_imagenet_r(str(tmp_path / "in"), str(tmp_path / "s1"), seed=1, **QUIET))
    assert [r["split"] for r in other] != [r["split"] for r in rows]                                   # seeded
    half = rows_of(R.build_imagenet_r(str(tmp_path / "in"), str(tmp_path / "h"), test_share=0.5, **QUIET))
    assert sum(r["split"] == "test" for r in half) == 15
    _, names, _, is_test = D.manifest_table(path)
    assert names == sorted(WNIDS.values()) and int(is_test.sum()) == 6
    d = D.read_manifest(path, 16, cache_dir=str(tmp_path / "cache"), log=lambda *a: None)
    assert d["images"].shape == (30, 3, 16, 16)
    with pytest.raises(SystemExit, match="test share"):
        R.build_imagenet_r(str(tmp_path / "in"), str(tmp_path / "x"), test_share=1.0, **QUIET)


def test_imagenet_r_split_ignores_other_files(tmp_path):
    """A file added to one class leaves every other class's split as it was (a split by hash of path)."""
    imagenet_r_tree(tmp_path / "in")
    before = {r["image"]: r["split"] for r in rows_of(R.build_imagenet_r(str(tmp_path / "in"), str(tmp_path / "a"), **QUIET))}
    jpeg(os.path.join(tmp_path, "in", "imagenet-r", "n01443537", "toy_77.jpg"), 5)
    after = {r["image"]: r["split"] for r in rows_of(R.build_imagenet_r(str(tmp_path / "in"), str(tmp_path / "a"), **QUIET))}
    assert all(after[k] == v for k, v in before.items() if "n01443537" not in k)


def test_imagenet_r_captions_file_and_the_cli(tmp_path):
    """Captions the user brings (a header, an imagenet-r/ prefix, commas and quotes, non-ASCII) are used
    where given and marked so; the rest keep the template, marked as such."""
    imagenet_r_tree(tmp_path / "in")
    caps = tmp_path / "caps.csv"
    caps.write_text('image,caption\n'
                    'imagenet-r/n01443537/art_0.jpg,"An orange fish, drawn in ""pastel"" — très joli"\n'
                    'n02085620/sketch_1.jpg,a pencil sketch of a small dog\n'
                    'n09999999/art_0.jpg,a caption for an image this copy lacks\n', encoding="utf-8")
    run = subprocess.run([sys.executable, "data.py", "imagenet-r", str(tmp_path / "in"), str(tmp_path / "out"),
                          "--captions", str(caps), "--seed", "3", "--test-share", "0.3", "--workers", "1"],
                         cwd=HERE, check=True, capture_output=True, text=True)
    rows = rows_of(tmp_path / "out" / "manifest.csv")
    by_file = {r["image"].split("imagenet-r/")[1]: r for r in rows}
    assert by_file["n01443537/art_0.jpg"]["text"] == 'An orange fish, drawn in "pastel" — très joli'
    assert by_file["n02085620/sketch_1.jpg"]["text_source"] == "captions"
    assert by_file["n01443537/sketch_1.jpg"]["text_source"] == "template"
    assert sum(r["text_source"] == "captions" for r in rows) == 2 and sum(r["split"] == "test" for r in rows) == 9
    assert "template captions: 28" in run.stdout and "captions matching no image: 1" in run.stdout
    empty = tmp_path / "empty.csv"
    empty.write_text("image,caption\n")
    with pytest.raises(SystemExit, match="no captions"):
        R.build_imagenet_r(str(tmp_path / "in"), str(tmp_path / "x"), captions=str(empty), **QUIET)


def test_imagenet_r_class_names_come_from_timm_and_are_unique():
    wnids, names = R.imagenet_r_wnids(), R.imagenet_names()
    assert len(wnids) == 200 and len({names[w] for w in wnids}) == 200
    assert names["n01443537"] == "goldfish" and names["n07753592"] == "banana"


# ----------------------------------------------------------------------------- a protocol's memory

@pytest.mark.parametrize("keep_image,keep_text", [(None, None), (0.2, None), (0.2, 0.8), (0.5, 0.3), (1.0, 0.99)])
def test_exemplar_bytes_is_what_encode_stores(keep_image, keep_text):
    """exmask.exemplar_bytes counts, without building one, the bytes exmask.encode stores."""
    g = torch.Generator().manual_seed(0)
    N, P, L, V = 49, 48, 16, 700
    for tokens in (1, 2, 3, 7, 16):
        patches = torch.randint(0, 256, (N, P), generator=g, dtype=torch.uint8)
        ids = torch.zeros(L, dtype=torch.long)
        ids[:tokens] = torch.randint(4, V, (tokens,), generator=g)
        idx = None if keep_image is None else exmask.keep_top(torch.rand(1, N, generator=g), exmask.keep_count(N, keep_image))[0]
        keep = None if keep_text is None else exmask.keep_text(torch.rand(1, L, generator=g), ids[None], 0, keep_text)[0]
        stored = exmask.nbytes(exmask.encode(patches, ids, 3, V, 0, idx, keep))
        assert exmask.exemplar_bytes(N, P, tokens, V, L, keep_image, keep_text) == stored
    assert exmask.exemplar_bytes(N, P, L, V, L) == exmask.full_bytes(N, P, L, V)      # the budget's unit


def test_budget_plan_for_the_paper_protocol():
    b = R.budget_plan(200)                                            # ViT-B/16 at 224 px, MiniLM's ids, 5 a class
    unit = 196 * 768 + 64 * 2 + 2
    assert b["full_exemplar_bytes"] == unit and b["class_bytes"] == 5 * unit and b["budget_bytes"] == 1000 * unit
    assert b["kept_patches"] == 10 and b["replay_per_class"] == 5                  # 5 % of 196
    assert b["exmask_per_class"] == 5 * unit // (10 * 768 + 25 + 64 * 2 + 2) == 96
    assert R.budget_plan(200, keep_image=0.1)["exmask_per_class"] == 48            # the previous default
    assert R.budget_plan(101, tokens=20)["exmask_per_class"] >= b["exmask_per_class"]     # shorter captions: more
    lo = R.budget_plan(200, lowres=4)                                  # a 56 x 56 thumbnail: 1/16 of the image more
    assert lo["exmask_exemplar_bytes"] == b["exmask_exemplar_bytes"] + 3 * 56 * 56
    assert lo["exmask_per_class"] < b["exmask_per_class"]
    small = R.budget_plan(10, memory_per_class=1, image_size=32, patch=4, context=24, vocab_size=700, keep_image=0.3,
                          keep_text=0.8)
    assert small["patches"] == 64 and small["kept_patches"] == 19 and small["replay_per_class"] == 1


def test_budget_refuses_impossible_protocols():
    for kw, msg in (({"patch": 0}, "patch must be at least 1"), ({"image_size": 8}, "no patches"),
                    ({"classes": 0}, "classes must be"), ({"keep_image": 0.0}, "shares in"),
                    ({"memory_per_class": 0}, "memory per class")):
        with pytest.raises(SystemExit, match=f"^error: .*{msg}"):
            R.budget_plan(**{"classes": 10, **kw})


def test_budget_cli(tmp_path):
    out = subprocess.run([sys.executable, "data.py", "budget", "--classes", "101", "--memory-per-class", "3",
                          "--image-size", "224", "--patch", "16", "--context", "40", "--vocab", "30522",
                          "--keep-image", "0.3", "--keep-text", "0.8", "--tokens", "30"],
                         cwd=HERE, check=True, capture_output=True, text=True).stdout
    b = R.budget_plan(101, 3, 224, 16, 40, 30522, 0.3, 0.8, 30)
    assert f"{b['budget_bytes']:,} bytes in all" in out
    assert f"replay: {b['replay_per_class']} exemplars a class" in out
    assert f"exmask: {b['exmask_per_class']} exemplars a class" in out and "59 of 196 patches" in out


def test_readme_protocol_commands_parse_and_quote_the_budget(monkeypatch):
    """The README's train.py commands for the two benchmarks are the protocol (ViT-B/16 at 224 px, SSF,
    5 full exemplars' bytes a class, 5 / 10 / 20 phases that split 101 or 200 classes), and the memory it
    quotes is budget_plan's."""
    import train as T
    readme = Path(HERE, "README.md").read_text(encoding="utf-8")
    got = []
    monkeypatch.setattr(T, "train", got.append)
    for name, classes in (("food101", 101), ("imagenet-r", 200)):
        lines = [ln for ln in readme.splitlines() if ln.startswith(f"python train.py --data data/{name}/manifest.csv")]
        assert len(lines) == 3
        for ln in lines:
            T.main(ln.replace("$MINILM", "minilm").split()[2:])
        cfgs = got[-3:]
        assert sorted(c.phases for c in cfgs) == [5, 10, 20]
        for c in cfgs:
            assert (c.memory_per_class, c.vit, c.model.adapter, c.methods) == (5, "vit_base_patch16_224", "ssf", "replay,exmask")
            D.phase_classes(list(range(classes)), c.phases, c.first_phase)          # splits without an error
        b = R.budget_plan(classes)
        for k in ("budget_bytes", "class_bytes", "full_exemplar_bytes", "exmask_exemplar_bytes"):
            assert f"{b[k]:,}" in readme
        assert (b["replay_per_class"], b["exmask_per_class"]) == (5, 96)


def test_the_budget_plan_uses_train_py_s_default_share(monkeypatch):
    import inspect

    import train as T
    assert inspect.signature(R.budget_plan).parameters["keep_image"].default == T.Config().keep_image
    got = []   # and so does the `budget` command
    monkeypatch.setattr(R, "budget_plan", lambda *a: got.append(a[6]) or {})
    monkeypatch.setattr(R, "show_budget", lambda plan: None)
    R.main(["budget"])
    assert got == [T.Config().keep_image]


def test_imagenet_r_keeps_a_training_row_and_reads_backslash_caption_paths(tmp_path):
    """Two images a class at --test-share 0.8 (round(1.6) would be 2): one stays for training, so the
    manifest is valid; a captions file written on Windows (.\\wnid\\file.jpg) is read, not skipped."""
    imagenet_r_tree(tmp_path / "in", per_class=2)
    caps = tmp_path / "caps.csv"
    caps.write_text("image,caption\n.\\n01443537\\sketch_1.jpg,a sketched fish\n", encoding="utf-8")
    rows = rows_of(R.build_imagenet_r(str(tmp_path / "in"), str(tmp_path / "out"), captions=str(caps),
                                      test_share=0.8, **QUIET))
    for name in WNIDS.values():
        splits = [r["split"] for r in rows if r["label"] == name]
        assert "train" in splits and ("test" in splits or len(splits) == 1)
    assert {r["image"].split("imagenet-r/")[1]: r["text"] for r in rows}["n01443537/sketch_1.jpg"] == "a sketched fish"


def test_imagenet_r_ignores_other_imagenet_classes_and_reads_captions_with_blank_lines(tmp_path):
    """A folder of an ImageNet class outside ImageNet-R's 200 is left out and counted: two such wnids
    can share a name ("crane", the bird and the machine), and neither is ImageNet-R's. A captions file
    with blank lines is read; a missing one is one error line."""
    imagenet_r_tree(tmp_path / "in")
    for wnid in ("n02012849", "n03126707"):                    # crane (bird), crane (machine)
        for k in range(3):
            jpeg(os.path.join(tmp_path, "in", "imagenet-r", wnid, f"art_{k}.jpg"), 7 + k)
    caps = tmp_path / "caps.csv"
    caps.write_text("image,caption\n\nn01443537/art_0.jpg,a fish\n\n", encoding="utf-8")
    log = []
    rows = rows_of(R.build_imagenet_r(str(tmp_path / "in"), str(tmp_path / "out"), captions=str(caps), log=log.append))
    assert {r["label"] for r in rows} == set(WNIDS.values()) and len(rows) == 30
    assert "folders not in ImageNet-R ignored: 2" in log[-1]
    assert {r["image"].split("imagenet-r/")[1]: r["text"] for r in rows}["n01443537/art_0.jpg"] == "a fish"
    with pytest.raises(SystemExit, match=r"^error: cannot read .*nope.csv"):
        R.build_imagenet_r(str(tmp_path / "in"), str(tmp_path / "x"), captions=str(tmp_path / "nope.csv"), **QUIET)
