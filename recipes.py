"""Datasets built as manifests (`python data.py NAME ...` runs these): the paper's two benchmarks from
copies the user has (food101: UPMC Food-101; imagenet-r: ImageNet-R, with captions the user brings or
template ones), the real-image development set from Debian's icon themes (icons), and generated JPEG
manifests for measuring data at scale (fake). Each writes OUT/manifest.csv (image, text, label,
split[, ...]) that train.py --data reads. `budget` prints what a protocol's memory holds, without training.

    python data.py food101 /data/food101 data/food101
    python data.py imagenet-r /data data/imagenet-r [--captions captions.csv]
    python data.py budget --classes 200 --memory-per-class 5
    python data.py icons data/icons-dev [--set dev|heldout] [--themes-root /usr/share/icons]
    python data.py fake data/fake-50000 --n 50000 --size 224
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys

import numpy as np

import exmask
from data import FILLERS, cores, first_line, manifest_table, write_csv

# ----------------------------------------------------------------------------- the paper's benchmarks

# UPMC Food-101 and ImageNet-R, from copies the user has, as they are laid out. Nothing is copied:
# the manifest names each image relative to OUT. Real copies hold more than images (hidden files,
# notes, the odd unreadable download), so every image is decoded once here, on every core, and a
# file that does not decode is skipped, counted and listed in OUT/skipped.csv: the image cache that
# train.py builds later stops at the first bad image.
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
FOOD101_LAYOUT = "ROOT/images/{train,test}/<class>/<file>.jpg and ROOT/texts/{train,test}_titles.csv"
# ImageNet-R file names are <rendition>_<n>.jpg; a few renditions read badly in "a ... of a goldfish"
RENDITION_WORDS = {"art": "artwork", "misc": "picture", "videogame": "video game picture",
                   "deviantart": "DeviantArt drawing"}


def is_image_name(name: str) -> bool:
    """A file that may be an image: an image extension, not hidden (macOS's ._ files included)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTS)


def _why_unreadable(paths: list[str]) -> list[str]:
    """Worker: for each file, "" where it decodes whole, else why not (one line)."""
    from PIL import Image
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.draft("RGB", (64, 64))        # JPEG: decode at a smaller scale, still every byte
                im.load()
            out.append("")
        except Exception as e:   # any failure to decode (truncated, not an image, a bomb) skips the file
            out.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": "))
    return out


def check_images(paths: list[str], workers: int = 0, what: str = "checking images") -> list[str]:
    """Why each image does not decode ("" where it does), on `workers` processes (0 = every core),
    in order, with a progress bar on a terminal."""
    from rich.console import Console
    from rich.progress import Progress
    con = Console(stderr=True)
    chunks = [paths[i:i + 64] for i in range(0, len(paths), 64)]
    workers = workers or cores()
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    out: list[str] = []
    with (Progress(console=con, transient=True, disable=not con.is_terminal) as bar,
          ctx.Pool(workers) if workers > 1 and len(chunks) > 1 else contextlib.nullcontext() as pool):
        task = bar.add_task(what, total=len(paths))
        for res in (pool.imap(_why_unreadable, chunks) if pool else map(_why_unreadable, chunks)):
            out += res
            bar.advance(task, len(res))
    return out


def read_text_file(path: str, log=print) -> str:
    """A text file as UTF-8 (a byte-order mark is fine); one that is not is read as Windows-1252, said once."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise SystemExit(f"error: cannot read {path}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        log(f"note: {path} is not UTF-8; read as Windows-1252")
        return raw.decode("cp1252", errors="replace")


def write_benchmark(out: str, rows: list[dict], skipped: list[tuple[str, str]], counts: dict, log=print) -> str:
    """OUT/manifest.csv from rows (dicts in one key order), OUT/skipped.csv (path, reason: always
    written, so an old list never outlives its run), and one summary line. Returns the manifest's path."""
    os.makedirs(out, exist_ok=True)
    listed = os.path.join(out, "skipped.csv")
    write_csv(listed, ["path", "reason"], skipped)
    if not rows:
        raise SystemExit(f"error: no readable image found; {len(skipped)} file(s) skipped, listed in {listed}")
    path = os.path.join(out, "manifest.csv")
    write_csv(path, list(rows[0]), [list(r.values()) for r in rows])
    try:               # train.py's checks, now: a class with test rows and no training rows stops here,
        manifest_table(path)       # and no manifest is left behind that train.py would refuse
    except SystemExit:
        os.remove(path)
        raise
    n_test = sum(r["split"] == "test" for r in rows)
    extra = ", ".join(f"{k}: {v:,}" for k, v in counts.items() if v)
    log(f"wrote {path}: {len(rows):,} images of {len({r['label'] for r in rows})} classes ({len(rows) - n_test:,} "
        f"train, {n_test:,} test); skipped {len(skipped)} (listed in {listed})" +
        (f"; {extra}" if extra else ""))
    return path


def build_food101(root: str, out: str, workers: int = 0, log=print) -> str:
    """UPMC Food-101 in the layout ViLT-based multimodal code uses -> OUT/manifest.csv (image, text, label,
    split), the official train/test split. Rows come from texts/{split}_titles.csv (file name, title,
    class; no header): a title with unquoted commas keeps every field between the first and the last;
    an image with no title row, a row with no image, a duplicate row or a header-like row is skipped
    and counted; files that are no images (hidden files, notes) are ignored and counted."""
    rows, skipped, seen = [], [], set()
    counts = {"stray files ignored": 0, "images without a title": 0}
    for split in ("train", "test"):
        csv_path = os.path.join(root, "texts", f"{split}_titles.csv")
        img_dir = os.path.join(root, "images", split)
        if not os.path.isfile(csv_path) or not os.path.isdir(img_dir):
            raise SystemExit(f"error: {root} is not a UPMC Food-101 copy: {csv_path if not os.path.isfile(csv_path) else img_dir} "
                             f"is missing (expected {FOOD101_LAYOUT})")
        listed = set()
        reader = csv.reader(io.StringIO(read_text_file(csv_path, log)))
        try:
            table = [(reader.line_num, fields) for fields in reader]     # the line each row ends on
        except csv.Error as e:     # e.g. a quote never closed runs past the field size limit
            raise SystemExit(f"error: cannot parse {csv_path} near line {reader.line_num}: {e}") from None
        for n, fields in table:
            if not any(f.strip() for f in fields):
                continue                                     # a blank line
            where = f"{os.path.relpath(csv_path, root)} line {n}"
            if len(fields) < 3 or not is_image_name(fields[0].strip()):
                skipped.append((where, f"not a row of file name, title, class: {','.join(fields)[:60]!r}"))
                continue
            file, label = fields[0].strip(), fields[-1].strip()
            title = " ".join(",".join(fields[1:-1]).split())  # one line, single spaces
            image = os.path.join(img_dir, label, file)
            if (split, file) in seen:
                skipped.append((where, f"a second row for {file}"))
            elif not os.path.isfile(image):
                skipped.append((os.path.relpath(image, root), f"no such image ({where})"))
            else:
                seen.add((split, file))
                listed.add(image)
                rows.append({"image": image, "text": title, "label": label, "split": split})
        for d, _, files in os.walk(img_dir):
            for f in files:
                p = os.path.join(d, f)
                if not is_image_name(f):
                    counts["stray files ignored"] += 1
                elif p not in listed:
                    counts["images without a title"] += 1
                    skipped.append((os.path.relpath(p, root), "no title row"))
    why = check_images([r["image"] for r in rows], workers, "checking Food-101 images")
    skipped += [(os.path.relpath(r["image"], root), w) for r, w in zip(rows, why) if w]
    counts["unreadable images"] = sum(bool(w) for w in why)
    rows = sorted((dict(r, image=os.path.relpath(r["image"], out)) for r, w in zip(rows, why) if not w),
                  key=lambda r: (r["split"] != "train", r["label"], r["image"]))
    return write_benchmark(out, rows, skipped, counts, log)


def imagenet_names() -> dict[str, str]:
    """ImageNet wnid -> a readable class name (the first WordNet lemma), from timm's package data
    (timm is a requirement): no table typed by hand."""
    import pkgutil
    lemmas = pkgutil.get_data("timm.data", "_info/imagenet_synset_to_lemma.txt").decode("utf-8")
    return {w: lemma.split(",")[0].strip() for w, lemma in csv.reader(lemmas.splitlines(), delimiter="\t")}


def imagenet_r_wnids() -> list[str]:
    """The 200 wnids of ImageNet-R, from timm's package data."""
    import pkgutil
    return pkgutil.get_data("timm.data", "_info/imagenet_r_synsets.txt").decode("utf-8").split()


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def template_caption(rendition: str, name: str) -> str:
    """The stand-in caption of an ImageNet-R image: "a sketch of a goldfish". It names the class."""
    what = RENDITION_WORDS.get(rendition, rendition.replace("_", " ") or "picture")
    return f"{article(what)} {what} of {article(name)} {name}"


def read_captions(path: str, log=print) -> dict[str, str]:
    """A captions CSV (relative image path, caption; a header row is fine) -> {"<wnid>/<file>": caption}.
    Paths may start with imagenet-r/ or ./ and use either slash."""
    out = {}
    for fields in csv.reader(io.StringIO(read_text_file(path, log))):
        if not fields:
            continue                                         # a blank line
        key = fields[0].strip().replace("\\", "/").removeprefix("./").removeprefix("imagenet-r/")
        if len(fields) < 2 or not is_image_name(key.rsplit("/", 1)[-1]):
            continue                                         # a header, or a row without a caption
        out[key] = " ".join(",".join(fields[1:]).split())
    if not out:
        raise SystemExit(f"error: no captions in {path} (expected rows of: relative image path, caption)")
    return out


def build_imagenet_r(root: str, out: str, captions: str = "", test_share: float = 0.2, seed: int = 0,
                     workers: int = 0, log=print) -> str:
    """ImageNet-R (ROOT/imagenet-r/<wnid>/<rendition>_<n>.jpg; ROOT may be the imagenet-r folder
    itself) -> OUT/manifest.csv (image, text, label, split, text_source). Labels are readable class
    names from the wnids. Captions come from `captions` (rows: path relative to imagenet-r/, caption)
    where it has the image, else from the template "a <rendition> of a <class>": text_source says
    which ("captions" or "template"). ImageNet-R has no split: each class's images are ordered by a
    hash of (seed, path) and the first test_share of them are test, so the split is seeded, exact per
    class and independent of which other files a copy holds."""
    if not 0 <= test_share < 1:
        raise SystemExit(f"error: the test share must lie in [0, 1), got {test_share}")
    base = os.path.join(root, "imagenet-r")
    base = base if os.path.isdir(base) else root
    if not os.path.isdir(base):
        raise SystemExit(f"error: no such folder {root} (expected ROOT/imagenet-r/<wnid>/<rendition>_<n>.jpg)")
    names = imagenet_names()
    known = set(imagenet_r_wnids())
    caps = read_captions(captions, log) if captions else {}
    found, counts = [], {"stray files ignored": 0, "folders not in ImageNet-R ignored": 0}
    for wnid in sorted(os.listdir(base)):
        d = os.path.join(base, wnid)
        if not os.path.isdir(d) or not re.fullmatch(r"n\d{8}", wnid):
            counts["stray files ignored"] += 1
            continue
        if wnid not in known:   # another ImageNet class: not ImageNet-R's, and its name could be one of them
            counts["folders not in ImageNet-R ignored"] += 1
            continue
        for d_, _, files in os.walk(d):
            for f in sorted(files):
                if is_image_name(f):
                    found.append((wnid, os.path.relpath(os.path.join(d_, f), base).replace(os.sep, "/")))
                else:
                    counts["stray files ignored"] += 1
    if not found:
        raise SystemExit(f"error: no images in {base} (expected <wnid>/<rendition>_<n>.jpg, e.g. n01443537/art_0.jpg)")
    why = check_images([os.path.join(base, rel) for _, rel in found], workers, "checking ImageNet-R images")
    skipped = [(rel, w) for (_, rel), w in zip(found, why) if w]
    counts["unreadable images"] = len(skipped)
    by_class: dict[str, list[str]] = {}
    for (wnid, rel), w in zip(found, why):
        if not w:
            by_class.setdefault(wnid, []).append(rel)
    rows, used = [], 0
    for wnid, rels in sorted(by_class.items()):
        rels.sort(key=lambda r: hashlib.sha256(f"{seed}:{r}".encode()).hexdigest())
        n_test = min(len(rels) - 1, round(len(rels) * test_share))       # a class keeps a training row
        name = names.get(wnid, wnid)
        for k, rel in enumerate(rels):
            m = re.fullmatch(r"(.+?)_\d+", os.path.splitext(os.path.basename(rel))[0])
            given = caps.get(rel)
            used += given is not None
            rows.append({"image": os.path.relpath(os.path.join(base, rel), out), "label": name,
                         "text": given if given is not None else template_caption(m.group(1) if m else "", name),
                         "split": "test" if k < n_test else "train",
                         "text_source": "captions" if given is not None else "template"})
    rows = [{k: r[k] for k in ("image", "text", "label", "split", "text_source")}
            for r in sorted(rows, key=lambda r: (r["label"], r["image"]))]
    counts["template captions"] = len(rows) - used
    if caps:
        counts["captions matching no image"] = len(caps) - used
    return write_benchmark(out, rows, skipped, counts, log)


# ----------------------------------------------------------------------------- the memory of a protocol

KEEP_IMAGE = 0.05       # train.Config.keep_image, the default of budget_plan and `budget` (a test keeps them equal)


def budget_plan(classes: int, memory_per_class: float = 5.0, image_size: int = 224, patch: int = 16,
                context: int = 64, vocab_size: int = 30522, keep_image: float = KEEP_IMAGE, keep_text: float = 1.0,
                tokens: int = 0, lowres: int = 0) -> dict:
    """What the memory of a protocol holds, without training, counted as train.py counts it: the
    budget's unit is one full exemplar at the longest caption (exmask.full_bytes), each class gets
    int(memory_per_class x unit) bytes, and an exemplar whose caption has `tokens` tokens (0 = the
    context: the fewest exemplars) costs exmask.exemplar_bytes, full for replay, masked for exmask.
    Defaults: ViT-B/16 at 224 px and a BERT-family text tower (all-MiniLM-L6-v2: 30,522 ids, the
    64 positions train.py keeps). lowres: exmask's exemplars also store a thumbnail (--lowres)."""
    for name, v in (("classes", classes), ("image size", image_size), ("patch", patch), ("context", context),
                    ("vocabulary", vocab_size)):
        if v < 1:
            raise SystemExit(f"error: the {name} must be at least 1, got {v}")
    if patch > image_size:
        raise SystemExit(f"error: the patch side {patch} is larger than the image side {image_size}: no patches")
    if memory_per_class <= 0 or not 0 < keep_image <= 1 or not 0 < keep_text <= 1 or tokens < 0 or lowres < 0:
        raise SystemExit("error: the memory per class must be positive, --keep-image and --keep-text shares in "
                         "(0, 1], --tokens and --lowres at least 0")
    n, p = (image_size // patch) ** 2, 3 * patch * patch
    tokens = min(tokens or context, context)
    unit = exmask.full_bytes(n, p, context, vocab_size)
    quota = int(memory_per_class * unit)
    replay = exmask.exemplar_bytes(n, p, tokens, vocab_size, context)
    masked = exmask.exemplar_bytes(n, p, tokens, vocab_size, context, keep_image, keep_text, lowres)
    return {"classes": classes, "patches": n, "kept_patches": exmask.keep_count(n, keep_image), "tokens": tokens,
            "full_exemplar_bytes": unit, "class_bytes": quota, "budget_bytes": quota * classes,
            "replay_exemplar_bytes": replay, "exmask_exemplar_bytes": masked,
            "replay_per_class": quota // replay, "exmask_per_class": quota // masked}


def show_budget(b: dict, log=print) -> None:
    log(f"memory for {b['classes']} classes: {b['budget_bytes']:,} bytes in all ({b['budget_bytes'] / 2 ** 20:,.1f} MiB), "
        f"{b['class_bytes']:,} a class (one full exemplar: {b['full_exemplar_bytes']:,} bytes)")
    log(f"  replay: {b['replay_per_class']} exemplars a class, {b['replay_exemplar_bytes']:,} bytes each "
        f"({b['patches']} patches, {b['tokens']} tokens)")
    log(f"  exmask: {b['exmask_per_class']} exemplars a class, {b['exmask_exemplar_bytes']:,} bytes each "
        f"({b['kept_patches']} of {b['patches']} patches, {b['tokens']} tokens)")


# ----------------------------------------------------------------------------- real images: icon themes

# The real-image development set: one concept (printer, folder, trash, ...) drawn by many Debian
# icon themes, as ImageNet-R draws one class in many renditions. The icon's alpha channel is its
# object mask. "dev" themes are bitmap themes used while developing the method; "heldout" themes
# (other artists, vector art) were never looked at while choosing anything.
ICON_MIN_THEMES = {"dev": 6, "heldout": 4}   # fewer heldout names are shared: 238 drawn by 4+ of them
ICON_SETS = {
    "dev": ("Adwaita", "Faenza", "Moka", "Tango", "elementary-xfce", "gnome", "gnome-colors-common", "mate",
            "nuoveXT2", "oxygen"),
    "heldout": ("breeze", "Numix", "elementary", "Faba", "gartoon", "suru", "yasis", "Nuovo", "Suede", "sugar"),
}
ICON_PACKAGES = ("adwaita-icon-theme faenza-icon-theme moka-icon-theme tango-icon-theme elementary-xfce-icon-theme "
                 "gnome-icon-theme gnome-colors-common mate-icon-theme lxde-icon-theme oxygen-icon-theme "
                 "breeze-icon-theme numix-icon-theme elementary-icon-theme faba-icon-theme gnome-icon-theme-gartoon "
                 "suru-icon-theme gnome-icon-theme-yasis gnome-icon-theme-nuovo gnome-icon-theme-suede "
                 "sugar-icon-theme librsvg2-bin")
PALETTE = {"red": (200, 40, 40), "orange": (230, 130, 30), "yellow": (225, 210, 60), "green": (50, 160, 60),
           "teal": (40, 160, 160), "blue": (40, 80, 200), "purple": (120, 60, 180), "pink": (225, 120, 170),
           "brown": (120, 80, 40), "grey": (128, 128, 128), "white": (235, 235, 235), "black": (25, 25, 25)}
CATEGORY_WORDS = {"apps": "application", "devices": "device", "places": "place", "actions": "action",
                  "mimetypes": "file type", "categories": "category", "emblems": "emblem", "emotes": "emote",
                  "animations": "animation", "applets": "applet"}
TEXTURES = ("plain", "gradient", "striped", "checked", "noisy", "blotchy")
ICON_TEMPLATES = (
    "{f} {what} {f} in the {theme} style on a {bg}",
    "a {bg} {f} behind a {what}",
    "{theme} {what} {f} {f} on {bg}",
    "{f} of a {what} drawn by {theme} over a {bg}",
    "{what} {f} {bg} {f}",
)


def _icon_files(theme_dir: str, vector: bool = True) -> dict[str, tuple[str, str]]:
    """One theme folder -> {icon name: (best file, category)}: files ranked by size, bitmaps of 48-128
    px by their size and the vector file (with `vector`) as a 96 px bitmap, so it beats bitmaps of
    48-64 px and loses to those of 96-128; then larger bitmaps, then any of 32 px or more. Without
    `vector` (no rsvg-convert to render them) vector files are not candidates and the best bitmap is
    kept. Symbolic (monochrome) icons are skipped; links (another name for the same drawing) are kept
    here and resolved by build_icons."""
    best: dict[str, tuple[int, str, str]] = {}
    for root, _, files in os.walk(theme_dir):
        parts = os.path.relpath(root, theme_dir).split(os.sep)
        size = 0
        for p in parts:
            m = re.fullmatch(r"(\d+)(?:x\d+)?(@2x)?", p)
            if m:
                size = int(m.group(1)) * (2 if m.group(2) else 1)
            elif p == "scalable":
                size = 96                       # rendered to order: as good as a 96 px bitmap
        if size < 32:
            continue
        cat = next((p for p in parts if p.isalpha() and p != "scalable" and p not in ("base",)), "misc")
        for f in files:
            name, ext = os.path.splitext(f)
            path = os.path.join(root, f)
            if ext not in (".png", ".svg") or (ext == ".svg" and not vector) or "symbolic" in name \
                    or not os.path.exists(path):
                continue
            rank = size if size <= 128 else 128 - size / 1000     # prefer 48-128 px, then larger ones
            if name not in best or rank > best[name][0]:
                best[name] = (rank, path, cat)
    return {n: (p, c) for n, (_, p, c) in best.items()}


def _load_icon(path: str, side: int):
    """An icon file -> RGBA PIL image of side x side (vector files through rsvg-convert)."""
    from PIL import Image
    if path.endswith(".svg"):
        png = subprocess.run(["rsvg-convert", "-w", str(side * 2), "-h", str(side * 2), path],
                             capture_output=True, check=True, timeout=30).stdout
        im = Image.open(io.BytesIO(png))
    else:
        im = Image.open(path)
    im = im.convert("RGBA")
    bbox = im.getchannel("A").point(lambda a: 255 if a > 16 else 0).getbbox()  # crop empty margins
    if bbox:
        im = im.crop(bbox)
    w, h = im.size
    s = side / max(w, h)
    return im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)


def _background(S: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A random background (S, S, 3) float and the words that describe it. Drawn independently of
    the class, so the background carries no class."""
    names = list(PALETTE)
    a, b = rng.choice(len(names), 2, replace=False)
    ca, cb = np.array(PALETTE[names[a]], np.float32), np.array(PALETTE[names[b]], np.float32)
    tex = TEXTURES[rng.integers(len(TEXTURES))]
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S
    if tex == "plain":
        w = np.zeros((S, S), np.float32)
    elif tex == "gradient":
        ang = rng.uniform(0, 2 * np.pi)
        w = np.clip((np.cos(ang) * (xx - .5) + np.sin(ang) * (yy - .5)) + .5, 0, 1)
    elif tex == "striped":
        f, ang = rng.uniform(3, 8), rng.uniform(0, np.pi)
        w = (np.sin(2 * np.pi * f * (np.cos(ang) * xx + np.sin(ang) * yy)) > 0).astype(np.float32)
    elif tex == "checked":
        f = int(rng.integers(3, 8))
        w = ((np.floor(xx * f) + np.floor(yy * f)) % 2).astype(np.float32)
    elif tex == "noisy":
        w = rng.random((S, S)).astype(np.float32)
    else:   # blotchy: a few soft blobs
        w = np.zeros((S, S), np.float32)
        for _ in range(int(rng.integers(3, 7))):
            cy, cx, r = rng.random(), rng.random(), rng.uniform(.1, .3)
            w = np.maximum(w, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
    img = ca * (1 - w[..., None]) + cb * w[..., None] + rng.normal(0, 8, (S, S, 3))
    words = f"{names[a]} background" if tex == "plain" else f"{tex} {names[a]} and {names[b]} background"
    return img.astype(np.float32), words


def build_icons(themes_root: str, out: str, themes: tuple = ICON_SETS["dev"], n_classes: int = 100,
                per_class: int = 48, min_themes: int = 6, size: int = 64, test_share: float = 0.2,
                object_side: tuple = (0.5, 0.8), seed: int = 0, split: str = "image", log=print) -> str:
    """Write a manifest of icons on random backgrounds: out/manifest.csv (image, text, label, split,
    mask), out/images/*.png, out/masks/*.png (the icon's alpha: the object mask). Classes are the icon
    names drawn by at least `min_themes` of `themes`, the most widely drawn first; each class gets
    `per_class` images spread evenly over its themes, each theme's drawing on several backgrounds. A
    seeded split per class: split "image", test_share of its images (a test image's drawing is then
    almost always in training too, on other backgrounds); "drawing", round(test_share x its themes)
    of its themes (at least one) held out whole, so every test image shows a drawing that no training
    image shows (the share of test images is then that of the held-out themes). Returns the path."""
    if split not in ("image", "drawing"):
        raise SystemExit(f"error: the split is by image or by drawing, got {split!r}")
    from PIL import Image
    rng = np.random.default_rng(seed)
    found = {}
    have_svg = shutil.which("rsvg-convert") is not None
    for t in themes:
        d = os.path.join(themes_root, t)
        if os.path.isdir(d):
            found[t] = _icon_files(d, vector=have_svg)
    if not found:
        raise SystemExit(f"error: none of the themes {', '.join(themes)} is in {themes_root} "
                         f"(install them: apt-get install {ICON_PACKAGES})")
    if not have_svg:
        log("note: rsvg-convert not found (apt-get install librsvg2-bin): vector icons skipped, bitmaps "
            "used where a theme has them (the set differs from one built with it)")
    count: dict[str, list[str]] = {}
    for t, files in found.items():
        for name in files:
            count.setdefault(name, []).append(t)
    # a drawing reached under several names (links) counts once, under its most widely drawn name,
    # so no two classes ever share a drawing
    for t, files in found.items():
        by_file: dict[str, list[str]] = {}
        for name, (path, _) in files.items():
            by_file.setdefault(os.path.realpath(path), []).append(name)
        for real, same in by_file.items():   # ties go to the file's own name
            own = os.path.splitext(os.path.basename(real))[0]
            keep = min(same, key=lambda n: (-len(count[n]), n != own, n))
            for n in same:
                if n != keep:
                    del files[n]
                    count[n].remove(t)
    names = sorted((n for n, ts in count.items() if len(ts) >= min_themes), key=lambda n: (-len(count[n]), n))
    if len(names) < n_classes:
        raise SystemExit(f"error: only {len(names)} icon names are drawn by {min_themes}+ of the "
                         f"{len(found)} themes found in {themes_root}; asked for {n_classes} classes")
    names = sorted(names[:n_classes])
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "masks"), exist_ok=True)
    rows = []
    for c, name in enumerate(names):
        ts = count[name]
        if split == "drawing":   # whole themes of this class held out
            held = rng.permutation(len(ts))[:max(1, round(len(ts) * test_share))]
            is_test = np.isin(np.arange(per_class) % len(ts), held)
        else:
            is_test = np.zeros(per_class, bool)
            is_test[rng.permutation(per_class)[:round(per_class * test_share)]] = True
        for k in range(per_class):
            theme = ts[k % len(ts)]
            path, cat = found[theme][name]
            side = int(size * rng.uniform(*object_side))
            try:
                icon = _load_icon(path, side)
            except (OSError, ValueError, subprocess.SubprocessError) as e:   # a damaged file in an installed theme
                raise SystemExit(f"error: cannot draw the icon {path}: {type(e).__name__}: "
                                 f"{first_line(e)} (reinstall its theme, or leave "
                                 f"{theme} out with --themes)") from None
            bg, bg_words = _background(size, rng)
            x, y = (int(rng.integers(0, size - s + 1)) for s in icon.size)
            canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8)).convert("RGBA")
            canvas.alpha_composite(icon, (x, y))
            mask = Image.new("L", (size, size), 0)
            mask.paste(icon.getchannel("A"), (x, y))
            stem = f"{c:03d}_{k:03d}"
            canvas.convert("RGB").save(os.path.join(out, "images", stem + ".png"))
            mask.save(os.path.join(out, "masks", stem + ".png"))
            # class words: the whole icon name (40 %), one of its words (45 %), or none (15 %)
            words = name.replace("_", "-").split("-")
            u = rng.random()
            what = (" ".join(words) if u < .4 else words[rng.integers(len(words))] if u < .85 else "") + \
                   f" {CATEGORY_WORDS.get(cat, cat)} icon"
            fill = {"{f}": lambda: FILLERS[rng.integers(len(FILLERS))], "{what}": lambda: what.strip(),
                    "{theme}": lambda: theme.lower().replace("-", " "), "{bg}": lambda: bg_words}
            text = ICON_TEMPLATES[rng.integers(len(ICON_TEMPLATES))]
            for key, fn in fill.items():
                while key in text:
                    text = text.replace(key, fn(), 1)
            rows.append({"image": f"images/{stem}.png", "text": text, "label": name,
                         "split": "test" if is_test[k] else "train", "mask": f"masks/{stem}.png"})
        if (c + 1) % 20 == 0:
            log(f"  {c + 1}/{len(names)} classes")
    path = os.path.join(out, "manifest.csv")
    write_csv(path, list(rows[0]), [list(r.values()) for r in rows])
    log(f"wrote {path}: {len(names)} classes from {len(found)} themes, {len(rows)} images "
        f"({sum(r['split'] == 'train' for r in rows)} train, {sum(r['split'] == 'test' for r in rows)} test)")
    return path


# ----------------------------------------------------------------------------- fake manifests, for measuring

def _fake_rows(job: tuple) -> int:
    """Worker: write the JPEGs of rows lo.. of a fake manifest; each image from its own seed, so the
    files do not depend on how the rows were shared out."""
    from PIL import Image, ImageDraw
    out, lo, colors, size, seed = job
    for i, col in enumerate(colors, lo):
        rng = np.random.default_rng([seed, i])
        # smooth colour fields plus grain: JPEGs about as large as photos' at this size
        low = rng.uniform(0, 255, (int(rng.integers(3, 9)),) * 2 + (3,)).astype(np.uint8)
        bg = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), np.float32)
        img = Image.fromarray(np.clip(bg + rng.normal(0, 6, bg.shape), 0, 255).astype(np.uint8))
        o = int(size * rng.uniform(0.2, 0.5))
        x, y = rng.integers(0, size - o, 2)
        ImageDraw.Draw(img).ellipse((int(x), int(y), int(x) + o, int(y) + o), fill=tuple(col))
        img.save(os.path.join(out, "images", f"{i // 1000:03d}", f"{i:06d}.jpg"), quality=90)
    return len(colors)


def make_fake(out: str, n: int, size: int = 224, classes: int = 100, seed: int = 0, workers: int = 0,
              log=print) -> str:
    """A generated manifest for measuring data at scale: out/manifest.csv (image, text, label) and
    n JPEGs of size x size under out/images/ (a class-coloured disc on a random smooth background
    with grain), written by `workers` processes (0 = every core). Returns the manifest's path."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    colors = rng.integers(0, 256, (classes, 3))[labels]                       # each class its colour
    for d in range(-(-n // 1000)):
        os.makedirs(os.path.join(out, "images", f"{d:03d}"), exist_ok=True)
    workers = workers or cores()
    jobs = [(out, lo, colors[lo:lo + 500].tolist(), size, seed) for lo in range(0, n, 500)]
    done = 0
    with mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers) as pool:
        for k in pool.imap_unordered(_fake_rows, jobs):
            done += k
            if done % 10000 < k or done == n:
                log(f"  {done:,}/{n:,} images")
    path = os.path.join(out, "manifest.csv")
    fills = (" ".join(FILLERS[j] for j in rng.integers(0, len(FILLERS), 3)) for _ in labels)
    write_csv(path, ["image", "text", "label"],   # the manifest last: where it exists, every image does
              ((f"images/{i // 1000:03d}/{i:06d}.jpg", f"a {fill} photo of a class{c:03d} thing", f"class{c:03d}")
               for i, (c, fill) in enumerate(zip(labels.tolist(), fills))))
    log(f"wrote {path}: {n:,} images of {size} px, {classes} classes")
    return path


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> None:
    import argparse
    p = argparse.ArgumentParser(description="Build datasets as manifests.")
    sub = p.add_subparsers(dest="cmd", required=True)
    ic = sub.add_parser("icons", help="the real-image development set: Debian icon themes on random backgrounds")
    ic.add_argument("out", help="output folder (manifest.csv, images/, masks/)")
    ic.add_argument("--set", default="dev", choices=sorted(ICON_SETS), help="which themes: dev or heldout")
    ic.add_argument("--themes", default="", help="comma-separated theme folders (overrides --set)")
    ic.add_argument("--themes-root", default="/usr/share/icons", help="where the themes are installed")
    ic.add_argument("--classes", type=int, default=100)
    ic.add_argument("--per-class", type=int, default=48, help="images per class (20 %% of them test)")
    ic.add_argument("--min-themes", type=int, default=0, help="a class must be drawn by this many themes "
                    f"(0 = {ICON_MIN_THEMES})")
    ic.add_argument("--size", type=int, default=64, help="image side in pixels")
    ic.add_argument("--seed", type=int, default=0)
    ic.add_argument("--split", default="image", choices=["image", "drawing"],
                    help="test rows: 20 %% of each class's images, or its drawings by 20 %% of its themes held out whole")
    fd = sub.add_parser("food101", help="UPMC Food-101 as a manifest, the official split")
    fd.add_argument("root", help=f"the copy: {FOOD101_LAYOUT}")
    fd.add_argument("out", help="output folder (manifest.csv, skipped.csv; the images stay where they are)")
    fd.add_argument("--workers", type=int, default=0, help="processes checking the images (0 = every core)")
    ir = sub.add_parser("imagenet-r", help="ImageNet-R as a manifest, a seeded 80/20 split per class")
    ir.add_argument("root", help="the folder holding imagenet-r/<wnid>/<rendition>_<n>.jpg (or imagenet-r itself)")
    ir.add_argument("out", help="output folder (manifest.csv, skipped.csv; the images stay where they are)")
    ir.add_argument("--captions", default="", help="CSV of (image path relative to imagenet-r/, caption), e.g. "
                    "MM-ImageNet-R's; images it lacks get a template caption (text_source=template)")
    ir.add_argument("--test-share", type=float, default=0.2, help="share of each class's images that are test")
    ir.add_argument("--seed", type=int, default=0, help="seeds the split")
    ir.add_argument("--workers", type=int, default=0, help="processes checking the images (0 = every core)")
    bd = sub.add_parser("budget", help="what a protocol's memory holds (bytes, exemplars per class), without training")
    bd.add_argument("--classes", type=int, default=200, help="classes seen at the end (MM-ImageNet-R 200, Food-101 101)")
    bd.add_argument("--memory-per-class", type=float, default=5.0, help="full exemplars' bytes per class (train.py's)")
    bd.add_argument("--image-size", type=int, default=224, help="the image tower's input side (ViT-B/16: 224)")
    bd.add_argument("--patch", type=int, default=16, help="patch side")
    bd.add_argument("--context", type=int, default=64, help="caption positions (train.py keeps 64 of a BERT tower's)")
    bd.add_argument("--vocab", type=int, default=30522, help="text vocabulary size (MiniLM/BERT: 30,522)")
    bd.add_argument("--keep-image", type=float, default=KEEP_IMAGE, help="share of patches exmask keeps (train.py's default)")
    bd.add_argument("--keep-text", type=float, default=1.0, help="share of caption tokens exmask keeps (1 = whole)")
    bd.add_argument("--lowres", type=int, default=0, help="exmask also stores each image at 1/LOWRES of its side (0 = no)")
    bd.add_argument("--tokens", type=int, default=0, help="tokens of a stored caption (0 = the context: fewest exemplars)")
    fk = sub.add_parser("fake", help="a generated manifest of JPEGs, for measuring data at scale")
    fk.add_argument("out", help="output folder (manifest.csv, images/)")
    fk.add_argument("--n", type=int, default=5000, help="images")
    fk.add_argument("--size", type=int, default=224, help="image side in pixels")
    fk.add_argument("--classes", type=int, default=100)
    fk.add_argument("--seed", type=int, default=0)
    fk.add_argument("--workers", type=int, default=0, help="processes (0 = every core)")
    a = p.parse_args(argv)
    if a.cmd == "food101":
        build_food101(a.root, a.out, a.workers)
        return
    if a.cmd == "imagenet-r":
        build_imagenet_r(a.root, a.out, a.captions, a.test_share, a.seed, a.workers)
        return
    if a.cmd == "budget":
        show_budget(budget_plan(a.classes, a.memory_per_class, a.image_size, a.patch, a.context, a.vocab,
                                a.keep_image, a.keep_text, a.tokens, a.lowres))
        return
    if a.cmd == "fake":
        make_fake(a.out, a.n, a.size, a.classes, a.seed, a.workers)
        return
    themes = tuple(t for t in a.themes.split(",") if t) or ICON_SETS[a.set]
    build_icons(a.themes_root, a.out, themes, a.classes, a.per_class, a.min_themes or ICON_MIN_THEMES[a.set], a.size,
                seed=a.seed, split=a.split)


if __name__ == "__main__":
    main()
