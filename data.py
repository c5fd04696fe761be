"""Data for exmask: the embedded default dataset, manifest datasets, tokenizers, phase splits.

The embedded default ("synth") is generated from a seed in about a second, with no files and no
network. Each class is an object sprite (a small colour pattern covering ~10 % of the image) on one
of a few textured backgrounds, and a caption that mixes class words (the class name, or only its
superclass), context words (the background, which the object's class prefers) and filler. The image
alone is ambiguous (noisy sprites), the text alone is ambiguous (the name is often missing), both
together are not: the task needs both towers. The same generator with another seed makes the
disjoint pretraining corpus for the default towers.

A dataset here is a plain dict of tensors and lists:
  images (N, 3, S, S) uint8, texts [str]*N, labels (N,) int64, split (N,) bool is_test,
  class_names [str]*C
"""
from __future__ import annotations

import csv
import io
import json
import os
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
            "is_test": torch.from_numpy(is_test), "class_names": names, "boxes": torch.from_numpy(boxes)}


# ----------------------------------------------------------------------------- manifests

def load_image(path: str, size: int) -> torch.Tensor:
    """One image file -> (3, size, size) uint8, the same preprocessing for training and serving."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BICUBIC)
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous()
    except FileNotFoundError:
        raise SystemExit(f"error: image not found: {path}") from None
    except OSError as e:
        raise SystemExit(f"error: cannot read image {path}: {e}") from None


def read_rows(path: str, required: tuple = ("image", "text", "label")) -> list[dict]:
    """The rows of a CSV (with header) or JSONL manifest, each with `path`: its image's path
    (image paths in the file are relative to the file). Training needs a label; serving does not."""
    if not os.path.exists(path):
        raise SystemExit(f"error: manifest not found: {path}")
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    try:
        if path.endswith((".jsonl", ".json")):
            rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
        else:
            rows = list(csv.DictReader(io.StringIO(raw)))
    except (json.JSONDecodeError, csv.Error) as e:
        raise SystemExit(f"error: cannot parse manifest {path}: {e}") from None
    if not rows:
        raise SystemExit(f"error: manifest is empty: {path}")
    missing = set(required) - set(rows[0])
    if missing:
        raise SystemExit(f"error: manifest {path} lacks field(s) {sorted(missing)}")
    root = os.path.dirname(os.path.abspath(path))
    return [dict(r, path=os.path.join(root, str(r["image"])), text=str(r["text"] or "")) for r in rows]


def read_manifest(path: str, image_size: int, test_share: float = 0.2, seed: int = 0) -> dict:
    """A CSV (with header) or JSONL manifest with fields image, text, label and optional split."""
    rows = read_rows(path)
    class_names = sorted({str(r["label"]) for r in rows})
    idx = {c: i for i, c in enumerate(class_names)}
    labels = torch.tensor([idx[str(r["label"])] for r in rows])
    images = torch.stack([load_image(r["path"], image_size) for r in rows])
    if "split" in rows[0] and all(r.get("split") for r in rows):
        is_test = torch.tensor([r["split"].strip().lower() == "test" for r in rows])
    else:   # seeded stratified split
        g = torch.Generator().manual_seed(seed)
        is_test = torch.zeros(len(rows), dtype=torch.bool)
        for c in range(len(class_names)):
            members = (labels == c).nonzero().flatten()
            members = members[torch.randperm(len(members), generator=g)]
            is_test[members[:int(round(len(members) * test_share))]] = True
    return {"images": images, "texts": [str(r["text"]) for r in rows], "labels": labels,
            "is_test": is_test, "class_names": class_names}


# ----------------------------------------------------------------------------- tokenizers

class SPTokenizer:
    """SentencePiece, trained in memory on captions or loaded from a .model file.

    encode() -> [bos] pieces [eos], bos doubling as the pooling token (like BERT's [CLS])."""
    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.get_piece_size()

    @classmethod
    def train(cls, texts: list[str], vocab_size: int = 400) -> "SPTokenizer":
        import sentencepiece as spm
        buf = io.BytesIO()
        # byte fallback (any text encodes, nothing is <unk>) needs 256 byte pieces + every character
        vocab_size = max(vocab_size, 256 + 4 + len(set("".join(texts))) + 8)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
            model_type="bpe", hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2)
        return cls(buf.getvalue())

    @classmethod
    def load(cls, path: str) -> "SPTokenizer":
        with open(path, "rb") as f:
            return cls(f.read())

    def save(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(self.proto)

    def tokenize(self, text: str) -> list[str]:
        return ["<s>"] + self.sp.encode(text, out_type=str) + ["</s>"]

    def encode(self, text: str) -> list[int]:
        return [self.bos_id] + self.sp.encode(text) + [self.eos_id]


class WordPieceTokenizer:
    """BERT's WordPiece from a vocab.txt (lower-casing, greedy longest match): [CLS] pieces [SEP]."""

    def __init__(self, vocab_path: str):
        with open(vocab_path, encoding="utf-8") as f:
            self.vocab = {w.rstrip("\n"): i for i, w in enumerate(f)}
        self.inv = {i: w for w, i in self.vocab.items()}
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.bos_id, self.eos_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.vocab_size = len(self.vocab)
        self.path = vocab_path

    def save(self, path: str) -> None:
        with open(self.path, encoding="utf-8") as f, open(path, "w", encoding="utf-8") as g:
            g.write(f.read())

    def _words(self, text: str) -> list[str]:
        import unicodedata
        out, cur = [], ""
        for ch in unicodedata.normalize("NFD", text.lower()):
            if unicodedata.category(ch) == "Mn":
                continue
            if ch.isspace():
                out, cur = out + [cur] * bool(cur), ""
            elif unicodedata.category(ch).startswith("P") or (33 <= ord(ch) <= 47):
                out, cur = out + [cur] * bool(cur) + [ch], ""
            else:
                cur += ch
        return out + [cur] * bool(cur)

    def encode(self, text: str) -> list[int]:
        ids = [self.bos_id]
        for w in self._words(text):
            start, pieces = 0, []
            while start < len(w):
                end = len(w)
                while end > start and (("##" if start else "") + w[start:end]) not in self.vocab:
                    end -= 1
                if end == start:
                    pieces = [self.unk_id]
                    break
                pieces.append(self.vocab[("##" if start else "") + w[start:end]])
                start = end
            ids += pieces
        return ids + [self.eos_id]

    def tokenize(self, text: str) -> list[str]:
        return [self.inv[i] for i in self.encode(text)]


def load_tokenizer(path: str):
    """A saved tokenizer: a SentencePiece `.model` file, a WordPiece `vocab.txt`, or a folder
    holding `tokenizer.model` or `vocab.txt`."""
    if os.path.isdir(path):
        for name in ("tokenizer.model", "vocab.txt"):
            if os.path.exists(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name))
        raise SystemExit(f"error: no tokenizer (tokenizer.model or vocab.txt) in {path}")
    return WordPieceTokenizer(path) if path.endswith(".txt") else SPTokenizer.load(path)


def tokenizer_filename(tok) -> str:
    return "vocab.txt" if isinstance(tok, WordPieceTokenizer) else "tokenizer.model"


def encode_texts(tok, texts: list[str], context: int) -> torch.Tensor:
    """Captions -> (N, context) int64 token ids, padded with pad_id; long captions are truncated
    (the end token is kept last, so the pooling token and the end marker always survive)."""
    out = torch.full((len(texts), context), tok.pad_id, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = tok.encode(t)
        if len(ids) > context:
            ids = ids[:context - 1] + [tok.eos_id]
        out[i, :len(ids)] = torch.tensor(ids)
    return out


# ----------------------------------------------------------------------------- phases

def class_order(n_classes: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_classes, generator=g).tolist()


def phase_classes(order: list[int], phases: int, first: int = 0) -> list[list[int]]:
    """Split the class order into phases: an optional larger first phase, the rest even."""
    first = first or len(order) // phases
    rest = len(order) - first
    if phases < 1 or first > len(order) or (phases > 1 and rest % (phases - 1)) or (phases == 1 and rest):
        raise ValueError(f"cannot split {len(order)} classes into {phases} phases (first phase {first})")
    step = rest // (phases - 1) if phases > 1 else 0
    return [order[:first]] + [order[first + i * step: first + (i + 1) * step] for i in range(phases - 1)]
