"""Datasets built as manifests (`python data.py NAME ...` runs these): the real-image development set
from Debian's icon themes (icons), and generated JPEG manifests for measuring data at scale (fake).
Each writes OUT/manifest.csv (image, text, label, split[, mask]) that train.py --data reads.

    python data.py icons data/icons-dev [--set dev|heldout] [--themes-root /usr/share/icons]
    python data.py fake data/fake-50000 --n 50000 --size 224
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import re
import shutil
import sys

import numpy as np

from data import FILLERS, cores, write_csv


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


def _icon_files(theme_dir: str) -> dict[str, tuple[str, str]]:
    """One theme folder -> {icon name: (best file, category)}: the largest bitmap of 48-128 px, else
    the vector file, else any bitmap of 32 px or more. Symbolic (monochrome) icons are skipped; links
    (another name for the same drawing) are kept here and resolved by build_icons."""
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
            if ext not in (".png", ".svg") or "symbolic" in name or not os.path.exists(path):
                continue
            rank = size if size <= 128 else 128 - size / 1000     # prefer 48-128 px, then larger ones
            if name not in best or rank > best[name][0]:
                best[name] = (rank, path, cat)
    return {n: (p, c) for n, (_, p, c) in best.items()}


def _load_icon(path: str, side: int):
    """An icon file -> RGBA PIL image of side x side (vector files through rsvg-convert)."""
    import subprocess
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
                object_side: tuple = (0.5, 0.8), seed: int = 0, log=print) -> str:
    """Write a manifest of icons on random backgrounds: out/manifest.csv (image, text, label, split,
    mask), out/images/*.png, out/masks/*.png (the icon's alpha: the object mask). Classes are the icon
    names drawn by at least `min_themes` of `themes`, the most widely drawn first; each class gets
    `per_class` images spread evenly over its themes; a seeded stratified split. Returns the path."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    found = {}
    for t in themes:
        d = os.path.join(themes_root, t)
        if os.path.isdir(d):
            found[t] = _icon_files(d)
    if not found:
        raise SystemExit(f"error: none of the themes {', '.join(themes)} is in {themes_root} "
                         f"(install them: apt-get install {ICON_PACKAGES})")
    have_svg = shutil.which("rsvg-convert") is not None
    if not have_svg:
        found = {t: {n: v for n, v in f.items() if not v[0].endswith(".svg")} for t, f in found.items()}
        log("note: rsvg-convert not found (apt-get install librsvg2-bin): vector icons skipped")
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
        split = np.zeros(per_class, bool)
        split[rng.permutation(per_class)[:round(per_class * test_share)]] = True
        for k in range(per_class):
            theme = ts[k % len(ts)]
            path, cat = found[theme][name]
            side = int(size * rng.uniform(*object_side))
            icon = _load_icon(path, side)
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
                         "split": "test" if split[k] else "train", "mask": f"masks/{stem}.png"})
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
    fk = sub.add_parser("fake", help="a generated manifest of JPEGs, for measuring data at scale")
    fk.add_argument("out", help="output folder (manifest.csv, images/)")
    fk.add_argument("--n", type=int, default=5000, help="images")
    fk.add_argument("--size", type=int, default=224, help="image side in pixels")
    fk.add_argument("--classes", type=int, default=100)
    fk.add_argument("--seed", type=int, default=0)
    fk.add_argument("--workers", type=int, default=0, help="processes (0 = every core)")
    a = p.parse_args(argv)
    if a.cmd == "fake":
        make_fake(a.out, a.n, a.size, a.classes, a.seed, a.workers)
        return
    themes = tuple(t for t in a.themes.split(",") if t) or ICON_SETS[a.set]
    build_icons(a.themes_root, a.out, themes, a.classes, a.per_class, a.min_themes or ICON_MIN_THEMES[a.set], a.size,
                seed=a.seed)


if __name__ == "__main__":
    main()
