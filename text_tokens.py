"""Tokenizers: SentencePiece trained on captions (the default towers), WordPiece (BERT-family
towers), byte-level BPE (CLIP) and SigLIP's SentencePiece; saving, loading and encoding captions.
data.py re-exports every name here, so `data.SPTokenizer` and the like keep working."""
from __future__ import annotations

import io
import itertools
import json
import math
import os

import torch

class SPTokenizer:
    """SentencePiece, trained in memory on captions or loaded from a .model file.

    encode() -> [bos] pieces [eos], bos doubling as the pooling token (like BERT's [CLS])."""
    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.get_piece_size()
        ids = (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id())
        if ids != (self.pad_id, self.unk_id, self.bos_id, self.eos_id):   # e.g. SentencePiece's default 0 unk, no pad
            raise ValueError(f"a SentencePiece model with pad/unk/bos/eos ids {ids}, not (0, 1, 2, 3) as exmask "
                             "trains them: its padding and special tokens would be read wrongly")

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


# BERT's basic tokenizer: ASCII symbols it splits off as punctuation (beside Unicode's P* categories),
# the CJK ideograph blocks it splits into single characters, and the longest word WordPiece splits
ASCII_SYMBOLS = ((33, 47), (58, 64), (91, 96), (123, 126))
CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
       (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
MAX_WORD = 100


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
        """BERT's basic tokenizer (lower case): control characters, NUL and U+FFFD dropped, accents
        stripped, split at whitespace, and every punctuation mark (Unicode P*, and ASCII's symbols
        such as < = > ^ ` | ~) and every CJK ideograph a word of its own."""
        import unicodedata
        out, cur = [], ""
        for ch in unicodedata.normalize("NFD", text.lower()):
            cp, cat = ord(ch), unicodedata.category(ch)
            if cp in (0, 0xFFFD) or cat == "Mn" or (cat.startswith("C") and ch not in "\t\n\r"):
                continue
            if ch in " \t\n\r" or cat == "Zs":
                out, cur = out + [cur] * bool(cur), ""
            elif cat.startswith("P") or any(a <= cp <= b for a, b in ASCII_SYMBOLS + CJK):
                out, cur = out + [cur] * bool(cur) + [ch], ""
            else:
                cur += ch
        return out + [cur] * bool(cur)

    def encode(self, text: str) -> list[int]:
        ids = [self.bos_id]
        for w in self._words(text):
            if len(w) > MAX_WORD:                     # BERT's bound: a longer word is unknown as a whole
                ids.append(self.unk_id)
                continue
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


def bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's alphabet: every byte as one printable character. Printable Latin-1 bytes stand
    for themselves; the other 68 (control bytes, space, ...) take the characters from U+0100 on. In
    OpenAI's order, printable bytes first: CLIP's vocabulary starts with these characters in this order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + n) for n, b in enumerate(rest)}


# CLIP's pre-tokenizer: at each point a contraction, else a run of letters, one digit, or a run of
# other non-space characters (OpenAI's regular expression, written out with unicodedata)
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


class ClipTokenizer:
    """CLIP's byte-level BPE (OpenAI CLIP, open_clip, Hugging Face CLIPTokenizer): the text cleaned
    as OpenAI's tokenizer cleans it (HTML entities unescaped, which Hugging Face's does not; NFC, one
    space for any whitespace, lower case), split into words,
    each word's UTF-8 bytes merged by rank with "</w>" marking its end. encode() -> <|startoftext|> pieces
    <|endoftext|>; pad_id is one past the vocabulary (a token of its own, never a real one: the
    text tower's embedding gets a row for it). OpenAI's and open_clip's tokenizers also run ftfy's
    fix_text first, which this one does not (no extra package): captions with curly quotes, Latin
    ligatures (fi), full-width characters, control characters or mis-decoded UTF-8 get other tokens
    than theirs; plain text gets the same (tests compare both)."""

    def __init__(self, vocab: dict[str, int], merges: list[str]):
        self.vocab, self.merges = vocab, merges
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        self.inv = {i: w for w, i in vocab.items()}
        self.byte_char = bytes_to_unicode()
        self.bos_id, self.eos_id = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
        self.pad_id = max(vocab.values()) + 1
        self.vocab_size = self.pad_id + 1
        self.cache: dict[str, list[str]] = {}

    @classmethod
    def load(cls, path: str) -> ClipTokenizer:
        """A saved tokenizer (save: one JSON file), a Hugging Face folder (vocab.json + merges.txt),
        or OpenAI's merges file (bpe_simple_vocab_16e6.txt.gz, from which CLIP derives its vocabulary)."""
        if os.path.isdir(path):
            with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
                vocab = json.load(f)
            with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:
                merges = [m for m in f.read().split("\n")[1:] if m.strip()]   # line 1: "#version: ..."
            return cls(vocab, merges)
        if path.endswith(".gz"):
            import gzip
            with gzip.open(path, "rt", encoding="utf-8") as f:
                merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]           # CLIP's 48,894 merges
            chars = list(bytes_to_unicode().values())
            words = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
            words += ["<|startoftext|>", "<|endoftext|>"]
            return cls({w: i for i, w in enumerate(words)}, merges)
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return cls(d["vocab"], d["merges"])

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"vocab": self.vocab, "merges": self.merges}, f, ensure_ascii=False)

    @staticmethod
    def words(text: str) -> list[str]:
        """Cleaned, lower-cased text split as CLIP's pre-tokenizer splits it."""
        import html
        import re
        import unicodedata
        text = unicodedata.normalize("NFC", html.unescape(html.unescape(text)))
        text = re.sub(r"\s+", " ", text).strip().lower()
        kind = lambda ch: "s" if ch.isspace() else unicodedata.category(ch)[0] if unicodedata.category(ch)[0] in "LN" else "o"
        out, i = [], 0
        while i < len(text):
            k = kind(text[i])
            c = next((c for c in CONTRACTIONS if text.startswith(c, i)), None)
            if c:
                j = i + len(c)
            elif k == "s":
                i += 1
                continue
            elif k == "N":                                  # digits one at a time
                j = i + 1
            else:                                           # a run of letters, or of other characters
                j = i + 1
                while j < len(text) and kind(text[j]) == k:
                    j += 1
            out.append(text[i:j])
            i = j
        return out

    def bpe(self, word: str) -> list[str]:
        """One word -> its BPE pieces: its bytes as characters, the last marked "</w>", then the
        lowest-ranked adjacent pair merged until no pair has a rank."""
        if word in self.cache:
            return self.cache[word]
        chars = [self.byte_char[b] for b in word.encode("utf-8")]
        parts = chars[:-1] + [chars[-1] + "</w>"]
        while len(parts) > 1:
            rank, first = min((self.ranks.get(p, math.inf), i) for i, p in enumerate(itertools.pairwise(parts)))
            if rank == math.inf:
                break
            a, b = parts[first], parts[first + 1]
            merged, i = [], 0
            while i < len(parts):                           # every occurrence of the pair, left to right
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def tokenize(self, text: str) -> list[str]:
        return ["<|startoftext|>"] + [p for w in self.words(text) for p in self.bpe(w)] + ["<|endoftext|>"]

    def encode(self, text: str) -> list[int]:
        return [self.vocab[p] for p in self.tokenize(text)]


class SiglipTokenizer:
    """SigLIP's SentencePiece model (spiece.model), read as Hugging Face's SiglipTokenizer reads it:
    lower case, ASCII punctuation removed, whitespace collapsed, then pieces and the end token </s>. No start token:
    SigLIP pools the context's last position (models.TextConfig.pool "last"), not the first. pad_id is
    one past the vocabulary (SigLIP's own padding, </s> to the full context, is the text tower's fill)."""

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.eos_id, self.unk_id = self.sp.piece_to_id("</s>"), self.sp.unk_id()
        self.bos_id = None
        self.pad_id = self.sp.get_piece_size()
        self.vocab_size = self.pad_id + 1

    @classmethod
    def load(cls, path: str) -> SiglipTokenizer:
        with open(path, "rb") as f:
            return cls(f.read())

    def save(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(self.proto)

    @staticmethod
    def clean(text: str) -> str:
        import re
        import string
        text = text.lower().translate(str.maketrans("", "", string.punctuation))
        return re.sub(r"\s+", " ", text).strip()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(self.clean(text)) + [self.eos_id]

    def tokenize(self, text: str) -> list[str]:
        return [self.sp.id_to_piece(i) for i in self.encode(text)]


TOKENIZER_FILES = {"tokenizer.model": SPTokenizer, "vocab.txt": WordPieceTokenizer, "bpe.json": ClipTokenizer,
                   "spiece.model": SiglipTokenizer}   # the name each kind is saved under beside a model


def load_tokenizer(path: str):
    """A saved tokenizer: a file named as in TOKENIZER_FILES (any other `.model` file: SentencePiece,
    any other `.txt`: WordPiece), or a folder holding one of those names."""
    if os.path.isdir(path):
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name))
        raise SystemExit(f"error: no tokenizer ({', '.join(TOKENIZER_FILES)}) in {path}")
    kind = TOKENIZER_FILES.get(os.path.basename(path), WordPieceTokenizer if path.endswith(".txt") else SPTokenizer)
    try:
        return kind(path) if kind is WordPieceTokenizer else kind.load(path)
    except FileNotFoundError:
        raise SystemExit(f"error: no tokenizer file {path}") from None
    except Exception as e:   # truncated or foreign (sentencepiece's own error runs to a page): one line
        raise SystemExit(f"error: cannot read tokenizer {path}: {type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:200]}") from None


def tokenizer_filename(tok) -> str:
    return next(name for name, kind in TOKENIZER_FILES.items() if isinstance(tok, kind))


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
