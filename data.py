"""Data for exmask: the embedded default dataset, manifest datasets, tokenizers, phase splits.

The embedded default ("synth") is generated from a seed in about a second, with no files and no
network. Each class is an object sprite (a small colour pattern covering ~10 % of the image) on one
of a few textured backgrounds, and a caption that mixes class words (the class name, or only its
superclass), context words (the background, which the object's class prefers) and filler. The image
alone is ambiguous (noisy sprites), the text alone is ambiguous (the name is often missing), both
together are not: the task needs both towers. The same generator with another seed makes the
disjoint pretraining corpus for the default towers.

A dataset here is a plain dict of tensors and lists:
  images (N, 3, S, S) uint8 (a manifest's: memory-mapped from the on-disk image cache), texts [str]*N,
  labels (N,) int64, split (N,) bool is_test, class_names [str]*C, and where known objects (N, S, S)
  uint8: the object mask (0..255)
"""
from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import sys
import uuid
import zlib
from dataclasses import dataclass

import numpy as np
import torch

# ----------------------------------------------------------------------------- embedded default

SYLLABLES = ("ka lo mi ne ru ta vo si pe du ga ri zo fe ni bu ke ma to li "
             "sa no vi de ku ra po mo te gu").split()
SUPERCLASSES = ("animal vehicle plant tool toy fruit bird fish insect building "
                "instrument furniture garment vessel stone gadget").split()
BACKGROUNDS = ("grass sand snow water sky brick road forest carpet wood").split()
FILLERS = ("a the photo picture image of this is there shows nice small big old new "
           "taken seen today very some with and here one clear").split()
TEMPLATES = (
    "{f} a {c} {f} on the {b}",
    "{f} {f} {c} in the {b} {f}",
    "the {b} {f} with a {c}",
    "{f} of a {c} near some {b} {f} {f}",
    "a {c} {f} {f} {b}",
)


@dataclass
class SynthConfig:
    n_classes: int = 100
    train_per_class: int = 40
    test_per_class: int = 20
    image_size: int = 32
    object_size: tuple = (10, 16) # sprite side range in pixels: 10-25 % of a 32 px image
    pixel_noise: float = 20.0     # std of per-pixel noise, in 0..255 units
    color_jitter: float = 40.0    # std of the per-sample shift of the object's colour
    name_prob: float = 0.35       # captions that name the class; the rest say only the superclass
    bg_prob: float = 0.6          # samples shown on the class's preferred background
    seed: int = 0                 # the world: superclasses, preferred backgrounds, noise
    class_offset: int = 0         # first class of the pool: pretraining uses a disjoint range


SHAPES = 12
COLORS = np.array([[230, 40, 40], [240, 140, 30], [230, 220, 40], [120, 220, 50], [30, 160, 60],
                   [40, 200, 200], [40, 90, 230], [130, 50, 220], [220, 60, 180], [245, 245, 245]], np.float32)
PATTERNS = 3                      # solid, stripes, checks
POOL = SHAPES * len(COLORS) * PATTERNS


def _class_pool() -> tuple[list[str], np.ndarray]:
    """Every possible class, in one fixed order: a unique 3-syllable name and a (shape, colour,
    pattern) triple. Classes are new combinations of shared visual attributes, so features
    learnt on one part of the pool transfer to another, as a pretrained backbone's do."""
    rng = np.random.default_rng(12345)
    names, seen = [], set()
    while len(names) < POOL:
        w = "".join(rng.choice(SYLLABLES, 3))
        if w not in seen:
            seen.add(w)
            names.append(w)
    triples = np.stack(np.unravel_index(rng.permutation(POOL), (SHAPES, len(COLORS), PATTERNS)), 1)
    return names, triples


def _shape_masks(n: int) -> np.ndarray:
    """(SHAPES, n, n) bool masks: disc, square, triangle, cross, ring, diamond, bars, L, T, X, frame."""
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) / n * 2 - 1        # -1..1
    r = np.hypot(xx, yy)
    return np.stack([r < 0.9, (abs(xx) < 0.75) & (abs(yy) < 0.75), (yy > -0.8) & (abs(xx) < (yy + 0.8) / 1.8),
                     (abs(xx) < 0.3) | (abs(yy) < 0.3), (r < 0.95) & (r > 0.5), abs(xx) + abs(yy) < 0.95,
                     abs(yy) < 0.35, abs(xx) < 0.35, (xx < -0.3) | (yy > 0.3), (yy < -0.3) | (abs(xx) < 0.25),
                     (abs(xx - yy) < 0.4) | (abs(xx + yy) < 0.4), (np.maximum(abs(xx), abs(yy)) > 0.55)])


def _backgrounds(S: int) -> np.ndarray:
    """(len(BACKGROUNDS), S, S, 3) float textures, fixed for every world so context words mean one thing."""
    rng = np.random.default_rng(777)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    out = []
    for _ in BACKGROUNDS:
        base = rng.uniform(40, 215, 3)
        tint = rng.uniform(-60, 60, 3)
        fx, fy = rng.uniform(0.2, 1.2, 2) * rng.choice([-1, 1], 2)
        wave = np.sin(fx * xx + fy * yy + rng.uniform(0, 6.28))[..., None]
        out.append(base + tint * wave)
    return np.stack(out).astype(np.float32)


def make_synth(cfg: SynthConfig = SynthConfig()) -> dict:
    """Generate the embedded default dataset (train and test) from `cfg.seed`."""
    if cfg.class_offset + cfg.n_classes > POOL:
        raise ValueError(f"the embedded generator has {POOL} classes; asked for {cfg.class_offset + cfg.n_classes}")
    rng = np.random.default_rng(cfg.seed)
    C, S = cfg.n_classes, cfg.image_size
    pool_names, pool_triples = _class_pool()
    names = pool_names[cfg.class_offset:cfg.class_offset + C]
    triples = pool_triples[cfg.class_offset:cfg.class_offset + C]
    supers = rng.integers(0, len(SUPERCLASSES), C)
    pref_bg = rng.integers(0, len(BACKGROUNDS), C)
    bgs = _backgrounds(S)

    per = cfg.train_per_class + cfg.test_per_class
    labels = np.repeat(np.arange(C), per)
    is_test = np.tile(np.arange(per) >= cfg.train_per_class, C)
    n = len(labels)
    bg = np.where(rng.random(n) < cfg.bg_prob, pref_bg[labels], rng.integers(0, len(BACKGROUNDS), n))
    imgs = bgs[bg].copy()                                            # (n, S, S, 3)
    lo, hi = cfg.object_size
    masks = {o: _shape_masks(o) for o in range(lo, hi + 1)}
    boxes = np.zeros((n, 3), np.int64)                               # object top, left, side
    objects = np.zeros((n, S, S), np.uint8)                          # object mask, 0/255
    for i in range(n):
        shape, color, pattern = triples[labels[i]]
        o = int(rng.integers(lo, hi + 1))
        y, x = rng.integers(0, S - o + 1, 2)
        col = COLORS[color] + rng.normal(0, cfg.color_jitter, 3)
        yy, xx = np.mgrid[0:o, 0:o]
        dark = [np.zeros((o, o), bool), (yy // 2) % 2 == 0, ((yy // 2) + (xx // 2)) % 2 == 0][pattern]
        sprite = np.where(dark[..., None], col * 0.35, col)          # (o, o, 3)
        m = masks[o][shape]
        imgs[i, y:y + o, x:x + o][m] = sprite[m]
        objects[i, y:y + o, x:x + o][m] = 255
        boxes[i] = (y, x, o)
    imgs += rng.normal(0, cfg.pixel_noise, imgs.shape).astype(np.float32)
    images = torch.from_numpy(np.clip(imgs, 0, 255).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()

    texts = []
    for i in range(n):
        c = labels[i]
        cls = names[c] if rng.random() < cfg.name_prob else SUPERCLASSES[supers[c]]
        fill = {"{f}": lambda: FILLERS[rng.integers(len(FILLERS))], "{c}": lambda: cls,
                "{b}": lambda: BACKGROUNDS[bg[i]]}
        words = TEMPLATES[rng.integers(len(TEMPLATES))].split()
        texts.append(" ".join(fill[w]() if w in fill else w for w in words))
    return {"images": images, "texts": texts, "labels": torch.from_numpy(labels).long(),
            "is_test": torch.from_numpy(is_test), "class_names": names, "boxes": torch.from_numpy(boxes),
            "objects": torch.from_numpy(objects)}


# ----------------------------------------------------------------------------- manifests

def decode_image(path: str, size: int) -> np.ndarray:
    """One image file -> (3, size, size) uint8 array: the one preprocessing for training, the image
    cache and serving (DECODER names it in the cache key). A photo is turned upright by its EXIF
    orientation; 16-bit and float grey images are scaled to 8 bits (PIL's convert would clip them to
    white); an alpha channel is dropped. A missing or unreadable file, or one too large to decode
    safely, is a one-line `error:` naming it."""
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):   # more than 8 bits a pixel: scale, not clip
                a = np.asarray(im, dtype=np.float64)
                top = (65535.0 if im.mode.startswith("I;16") or a.max() > 255 else   # 16 bits
                       1.0 if im.mode == "F" and a.max() <= 1 else 255.0)              # floats in 0..1
                im = Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8))
            im = im.convert("RGB").resize((size, size), Image.BICUBIC)
            return np.asarray(im).transpose(2, 0, 1).copy()                   # (3, S, S)
    except FileNotFoundError:
        raise SystemExit(f"error: image not found: {path}") from None
    except (OSError, Image.DecompressionBombError) as e:
        raise SystemExit(f"error: cannot read image {path}: {e}") from None


def load_image(path: str, size: int) -> torch.Tensor:
    """One image file -> (3, size, size) uint8 tensor (decode_image)."""
    return torch.from_numpy(decode_image(path, size))


def write_atomic(path: str, write) -> None:
    """write(tmp) to a temporary file beside `path`, then rename it into place: a reader (or a run
    killed mid-write) never sees a half-written file, and the last good file stays until then."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def first_line(e: BaseException, n: int = 200) -> str:
    """An exception's message cut to its first line (at most n characters): libraries' own messages
    run to pages, and an `error:` line quotes what broke in one line."""
    return (str(e).strip().splitlines() or [""])[0][:n]


def write_json(path: str, obj, indent: int | None = 1) -> None:
    """obj as JSON at `path`, written atomically (write_atomic)."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
    write_atomic(path, write)


def write_csv(path: str, header: list[str], rows) -> None:
    """A CSV with a header (rows: sequences in the header's order), UTF-8, written atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    write_atomic(path, write)


def _decode_text(raw: bytes, path: str) -> str:
    """A manifest's bytes as text: UTF-8, with or without the byte-order mark spreadsheets write."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise SystemExit(f"error: manifest {path} is not UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start} "
                         f"(line {line}); save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 {os.path.basename(path)})") from None


def read_rows(path: str, required: tuple = ("image", "text", "label")) -> list[dict]:
    """The rows of a CSV (with header) or JSONL manifest, each with `path`: its image's path
    (image paths in the file are relative to the file), and `line`: the row's line in the file, which
    every error about a row names. Training needs a label; serving does not.
    Every problem found here is one `error:` line naming the file, the row and the field."""
    if not os.path.exists(path):
        raise SystemExit(f"error: manifest not found: {path}")
    with open(path, "rb") as f:
        raw = _decode_text(f.read(), path)
    jsonl = path.lower().endswith((".jsonl", ".json"))   # JSONL by its extension, in any case; else CSV
    lines = []                                      # each row's line in the file
    try:
        if jsonl:
            rows = []
            for n, line in enumerate(raw.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"error: cannot parse manifest {path} line {n}: {e.msg} (column {e.colno})") from None
                    if not isinstance(rows[-1], dict):
                        raise SystemExit(f"error: manifest {path} line {n}: expected a JSON object, got {line[:40]!r}")
                    lines.append(n)
        else:
            reader = csv.DictReader(io.StringIO(raw))
            if reader.fieldnames:                   # "image, text, label" (spaces after the commas) is fine
                reader.fieldnames = [f.strip() for f in reader.fieldnames]
            rows = list(reader)
            lines = list(range(2, len(rows) + 2))   # a CSV's header is line 1 (quoted line breaks aside)
    except csv.Error as e:
        raise SystemExit(f"error: cannot parse manifest {path}: {e}") from None
    if not rows:
        raise SystemExit(f"error: manifest is empty: {path}")
    missing = set(required) - set(rows[0])
    if missing:
        raise SystemExit(f"error: manifest {path} lacks field(s) {sorted(missing)}")
    for n, r in zip(lines, rows):
        for k in ("image", "label"):
            if k in required and (r.get(k) is None or not str(r[k]).strip()):
                raise SystemExit(f"error: manifest {path} line {n}: empty field {k!r}")
        if r.get("label") is not None:
            r["label"] = str(r["label"]).strip()   # " cat" and "cat" are one class
    root = os.path.dirname(os.path.abspath(path))
    return [dict(r, path=os.path.join(root, str(r["image"])), text=str(r.get("text") or ""), line=n)
            for n, r in zip(lines, rows)]


SPLITS = {"train": False, "test": True}   # a manifest's split values (any case) -> is_test


def manifest_split(rows: list[dict], path: str) -> torch.Tensor | None:
    """A manifest's own split, (N,) bool is_test, or None where it has none (no `split` field, or every
    row blank). Only train and test: any other value, or a mix of blank and given, is an error naming
    the rows, so data never moves between splits silently."""
    given = [str(r.get("split") or "").strip().lower() for r in rows]
    if not any(given):
        return None
    bad = [(r["line"], v) for r, v in zip(rows, given) if v not in SPLITS]
    if bad:
        lines = ", ".join(str(n) for n, _ in bad[:5]) + (" ..." if len(bad) > 5 else "")
        what = "blank" if not bad[0][1] else repr(bad[0][1])
        raise SystemExit(f"error: manifest {path}: split must be train or test, got {what} on line(s) {lines} "
                         f"({len(bad)} row(s)); give every row a split, or none")
    return torch.tensor([SPLITS[v] for v in given])


def load_mask(path: str, size: int) -> torch.Tensor:
    """An object-mask image (white = object) -> (size, size) uint8."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.asarray(im.convert("L").resize((size, size), Image.BILINEAR)).copy())
    except OSError as e:
        raise SystemExit(f"error: cannot read mask {path}: {e}") from None


# ----------------------------------------------------------------------------- the image cache

# A manifest's images are decoded once, in parallel, into one uint8 file (N, 3, S, S) that is
# memory-mapped and read by batch, so a manifest larger than RAM trains. Beside it a small JSON index
# holds the format version, the key, the shape and each row's crc32. The key covers the manifest's
# bytes, the image size, the decoder and every image file's path, size, mtime and ctime (a copy that
# restores mtime still changes ctime): an edited image makes the cache stale. The file is named by
# the manifest's location and the image size, so a stale cache is replaced, not left beside the new one.
CACHE_VERSION = 2
DECODER = "exif upright, 16-bit scaled, RGB, bicubic"   # what decode_image does: a change makes caches stale
CHECK_ROWS = 64            # rows whose checksum is verified each time a cache is opened (all of a small one)


def cache_root(path: str = "") -> str:
    """Where exmask caches things: `path`, else $EXMASK_CACHE, else ~/.cache/exmask."""
    return path or os.environ.get("EXMASK_CACHE") or os.path.expanduser("~/.cache/exmask")


def cores() -> int:
    """The cores this process may use (a pool's default size)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cache_key(manifest: str, paths: list[str], size: int) -> str:
    """A fingerprint of what the cache holds: the manifest's bytes, the size, the decoder (DECODER and
    Pillow's version), each image file's path, size, mtime and ctime. A missing image is an `error:`
    here, before anything is decoded."""
    import PIL
    h = hashlib.sha256(f"exmask image cache v{CACHE_VERSION}, {size} px, {DECODER}, Pillow {PIL.__version__}\n".encode())
    with open(manifest, "rb") as f:
        h.update(f.read())
    for p in paths:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise SystemExit(f"error: image not found: {p}") from None
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    return h.hexdigest()[:24]


def _decode_rows(job: tuple) -> tuple[int, list[int] | str]:
    """Worker: decode `paths` into the cache file `out` from row lo on (plain writes, not a memory
    map: the worker's memory stays one image). Returns (lo, each row's crc32), or (lo, the error line)."""
    out, size, lo, paths = job
    crcs = []
    with open(out, "r+b") as f:
        f.seek(lo * 3 * size * size)
        try:
            for p in paths:
                row = decode_image(p, size)                                     # (3, S, S)
                f.write(row.data)
                crcs.append(zlib.crc32(row))
        except SystemExit as e:
            return lo, str(e)
    return lo, crcs


def decode_images(paths: list[str], size: int, out: str, workers: int = 0, progress=None) -> list[int]:
    """Decode every image into the new file `out`, (N, 3, size, size) uint8, on `workers` processes
    (0 = every core this process may use); progress(done, total) after each chunk. Returns each row's
    crc32. A bad image stops the work with its `error:` line."""
    N = len(paths)
    with open(out, "wb") as f:
        f.truncate(N * 3 * size * size)                                         # sparse until written
    workers = workers or cores()
    step = max(1, min(256, -(-N // (4 * workers))))                             # a few chunks per worker
    jobs = [(out, size, lo, paths[lo:lo + step]) for lo in range(0, N, step)]
    crcs, done = [0] * N, 0
    # fork: workers start at once and share the parent's modules; they use PIL and numpy, not torch
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    with (ctx.Pool(workers) if workers > 1 and len(jobs) > 1 else contextlib.nullcontext()) as pool:
        for lo, res in (pool.imap_unordered(_decode_rows, jobs) if pool else map(_decode_rows, jobs)):
            if isinstance(res, str):
                raise SystemExit(res)
            crcs[lo:lo + len(res)] = res
            done += len(res)
            if progress:
                progress(done, N)
    return crcs


def check_cache(base: str, key: str, shape: tuple) -> str:
    """"" when the cache at `base` (.u8 and .json) is whole and current, else why not."""
    if not os.path.exists(base + ".json"):
        return "its index is missing" if os.path.exists(base + ".u8") else "missing"
    try:
        with open(base + ".json") as f:
            meta = json.load(f)
        crcs = meta["crc32"]
        if meta["version"] != CACHE_VERSION or len(crcs) != meta["shape"][0]:
            return "its index is of another format"
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return "its index is unreadable"
    if meta["key"] != key:
        return "stale (the manifest or an image changed since it was built)"
    if tuple(meta["shape"]) != tuple(shape):
        return "its index is of another shape"
    want = math.prod(shape)
    have = os.path.getsize(base + ".u8") if os.path.exists(base + ".u8") else 0
    if have != want:
        return f"the file has {have:,} bytes instead of {want:,}"
    mm = np.memmap(base + ".u8", np.uint8, "r", shape=shape)
    N = shape[0]
    rows = np.arange(N) if N <= CHECK_ROWS else np.unique(np.r_[0, N - 1, np.random.default_rng().choice(N, CHECK_ROWS - 2)])
    for i in rows:   # ascending: front to back on the disk
        if zlib.crc32(mm[i]) != crcs[i]:
            return f"corrupt (row {i} fails its checksum)"
    return ""


def _remove_orphans(base: str) -> None:
    """Delete the temporary files of builds at `base` whose process is gone (killed mid-build): at
    scale each is gigabytes. A build still running in another process keeps its files."""
    for f in glob.glob(glob.escape(base) + ".*-*"):
        pid = f[len(base) + 1:].split("-")[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            os.remove(f)
        except (ValueError, PermissionError):   # not one of ours / alive under another user
            pass


def image_cache(manifest: str, paths: list[str], size: int, cache_dir: str = "", workers: int = 0,
                log=print, progress=None) -> np.memmap:
    """The images of `paths` (the rows of `manifest`) at `size` px as a memmap (N, 3, size, size)
    uint8, decoded once into the cache (cache_root(cache_dir)/images) and opened from there
    afterwards; a missing, corrupt or stale cache is (re)built."""
    shape = (len(paths), 3, size, size)
    key = cache_key(manifest, paths, size)
    root = os.path.join(cache_root(cache_dir), "images")
    where = hashlib.sha256(os.path.abspath(manifest).encode()).hexdigest()[:8]
    base = os.path.join(root, f"{os.path.splitext(os.path.basename(manifest))[0]}-{where}-{size}px")
    why = check_cache(base, key, shape)
    if why:
        log(f"image cache {base}.u8: {why}; " + ("building it" if why == "missing" else "rebuilding it") +
            f" ({len(paths):,} images, {math.prod(shape) / 2 ** 20:,.0f} MiB)")
        os.makedirs(root, exist_ok=True)
        _remove_orphans(base)
        tmp = f"{base}.{os.getpid()}-{uuid.uuid4().hex[:8]}"    # processes side by side never share a file
        try:
            crcs = decode_images(paths, size, tmp + ".u8", workers, progress)
            with open(tmp + ".json", "w") as f:
                json.dump({"version": CACHE_VERSION, "key": key, "shape": shape,
                           "manifest": os.path.abspath(manifest), "crc32": crcs}, f)
            os.replace(tmp + ".u8", base + ".u8")      # the index last: it vouches for a whole file
            os.replace(tmp + ".json", base + ".json")
        finally:
            for ext in (".u8", ".json"):
                if os.path.exists(tmp + ext):
                    os.remove(tmp + ext)
    # copy-on-write: a writable array for torch.from_numpy; nothing written ever reaches the file
    return np.memmap(base + ".u8", np.uint8, "c", shape=shape)


def read_manifest(path: str, image_size: int, test_share: float = 0.2, seed: int = 0, cache_dir: str = "",
                  workers: int = 0, log=print, progress=None) -> dict:
    """A CSV (with header) or JSONL manifest with fields image, text, label, optional split and
    optional mask (an object-mask image, as data.py icons writes). Without a split, a stratified
    split seeded by `seed` alone: train.py passes a fixed seed, so every run seed tests on the same rows.
    "images" is backed by the on-disk image cache (image_cache: built on the first read, with
    `workers` processes and progress(done, total)), so it costs no RAM until rows are read."""
    rows, class_names, labels, is_test = manifest_table(path, test_share, seed)
    # every check runs before the images are decoded (the long work)
    images = torch.from_numpy(image_cache(path, [r["path"] for r in rows], image_size, cache_dir, workers, log,
                                          progress))                                      # (N, 3, S, S) uint8
    out = {"images": images, "texts": [str(r["text"]) for r in rows], "labels": labels,
           "is_test": is_test, "class_names": class_names}
    if all(r.get("mask") for r in rows):
        root = os.path.dirname(os.path.abspath(path))
        out["objects"] = torch.stack([load_mask(os.path.join(root, str(r["mask"])), image_size) for r in rows])
    return out


def manifest_table(path: str, test_share: float = 0.2, seed: int = 0) -> tuple[list[dict], list[str], torch.Tensor,
                                                                                torch.Tensor]:
    """A manifest's rows, class names (sorted), labels (N,) and is_test (N,), checked: cheap (no
    image is read), so train.py runs it before any long work. Every class needs a training row."""
    rows = read_rows(path)
    class_names = sorted({str(r["label"]) for r in rows})
    idx = {c: i for i, c in enumerate(class_names)}
    labels = torch.tensor([idx[str(r["label"])] for r in rows])
    is_test = manifest_split(rows, path)
    if is_test is None:   # seeded stratified split
        g = torch.Generator().manual_seed(seed)
        is_test = torch.zeros(len(rows), dtype=torch.bool)
        for c in range(len(class_names)):
            members = (labels == c).nonzero().flatten()
            members = members[torch.randperm(len(members), generator=g)]
            is_test[members[:int(round(len(members) * test_share))]] = True
    no_train = [class_names[c] for c in labels[is_test].unique().tolist() if not (~is_test & (labels == c)).any()]
    if no_train:
        raise SystemExit(f"error: manifest {path}: class(es) {no_train[:5]} have test rows but no training rows")
    return rows, class_names, labels, is_test


def carve_validation(labels: torch.Tensor, is_test: torch.Tensor, share: float, seed: int = 0) -> torch.Tensor:
    """A validation split carved from the training rows: (N,) bool, `share` of each class's training
    rows (at least one where a class has two or more), chosen by a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    val = torch.zeros_like(is_test)
    for c in labels.unique().tolist():
        members = ((labels == c) & ~is_test).nonzero().flatten()
        k = min(len(members) - 1, max(1, int(round(len(members) * share))))
        val[members[torch.randperm(len(members), generator=g)[:max(k, 0)]]] = True
    return val


# ----------------------------------------------------------------------------- tokenizers (text_tokens.py)

from text_tokens import (  # noqa: E402,F401  (re-exported: data.SPTokenizer etc.)
    TOKENIZER_FILES, ClipTokenizer, SiglipTokenizer, SPTokenizer, WordPieceTokenizer, bytes_to_unicode, encode_texts,
    load_tokenizer, tokenizer_filename)


# ----------------------------------------------------------------------------- phases

def class_order(n_classes: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_classes, generator=g).tolist()


def phase_classes(order: list[int], phases: int, first: int = 0) -> list[list[int]]:
    """Split the class order into phases: an optional larger first phase, the rest even."""
    first = first or len(order) // phases
    rest = len(order) - first
    if (phases < 1 or first < 1 or first > len(order) or (phases > 1 and (rest < phases - 1 or rest % (phases - 1)))
            or (phases == 1 and rest)):
        raise ValueError(f"cannot split {len(order)} classes into {phases} phases (first phase {first}): "
                         "every phase needs a class, and the phases after the first an equal number")
    step = rest // (phases - 1) if phases > 1 else 0
    return [order[:first]] + [order[first + i * step: first + (i + 1) * step] for i in range(phases - 1)]


# ----------------------------------------------------------------------------- CLI

if __name__ == "__main__":   # the dataset builders live in recipes.py: python data.py icons|fake ...
    import recipes
    recipes.main()
