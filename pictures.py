"""Pictures of a run, with PIL only: accuracy per phase, and masked exemplars (the paper's Figure 4:
image, attention map, kept patches, and the caption with kept words in red)."""
from __future__ import annotations

import os

import torch

import data as D
import models as M


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def draw_masked(path: str, shown: list[dict], p: int, tok, class_names: list[str]) -> None:
    """The paper's Figure 4 for a few exemplars: image, attention map, kept patches, and the
    caption with kept tokens in red and dropped ones in grey."""
    from PIL import Image, ImageDraw
    z = 4                                                        # pixel zoom
    S = shown[0]["patches"].shape[0] ** 0.5 * p
    cell = int(S * z)
    W, H = 3 * (cell + 10) + 520, len(shown) * (cell + 10) + 30
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = _font(14)
    for col, title in enumerate(("image", "attention", "kept patches")):
        d.text((col * (cell + 10), 5), title, fill="black", font=font)
    d.text((3 * (cell + 10), 5), "caption: kept (red), dropped (grey)", fill="black", font=font)
    for r, ex in enumerate(shown):
        y0 = 30 + r * (cell + 10)
        full = M.unpatchify(ex["patches"][None].float(), p)[0]                      # (3, S, S)
        pil = lambda t: Image.fromarray(t.clamp(0, 255).byte().permute(1, 2, 0).numpy()).resize((cell, cell), Image.NEAREST)
        img.paste(pil(full), (0, y0))
        if ex["attn"] is not None:
            a = ex["attn"] / ex["attn"].max()
            g = int(len(a) ** 0.5)
            amap = (a.view(1, 1, g, g) * 255).expand(1, 3, g, g)[0]
            img.paste(pil(amap), (cell + 10, y0))
        kept = torch.zeros(ex["patches"].shape[0], dtype=torch.bool)
        kept[ex["kept"] if ex["kept"] is not None else slice(None)] = True
        masked = M.unpatchify((ex["patches"].float() * kept[:, None])[None], p)[0]
        img.paste(pil(masked), (2 * (cell + 10), y0))
        x, y = 3 * (cell + 10), y0
        d.text((x, y), class_names[ex["label"]], fill="black", font=font)
        y += 20
        real = (ex["ids"] != tok.pad_id).nonzero().flatten().tolist()
        for j in real:
            piece = tok.sp.id_to_piece(int(ex["ids"][j])) if hasattr(tok, "sp") else tok.inv[int(ex["ids"][j])]
            piece = piece.replace("\u2581", " ")
            keep = ex["keep"] is None or bool(ex["keep"][j])
            w = d.textlength(piece, font=font)
            if x + w > W - 5:
                x, y = 3 * (cell + 10), y + 18
            d.text((x, y), piece, fill=(200, 0, 0) if keep else (170, 170, 170), font=font)
            x += w + 2
    os.makedirs(os.path.dirname(path), exist_ok=True)
    D.write_atomic(path, lambda tmp: img.save(tmp, format="PNG"))


def draw_accuracy(path: str, results: list[dict]) -> None:
    """Accuracy on all seen classes after each phase, one line per method: the mean over its runs
    (seeds), the legend saying how many."""
    from PIL import Image, ImageDraw
    W, H, m = 640, 420, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = _font(13)
    T = max(len(r["phase_accuracy"]) for r in results)
    X = lambda t: m + (W - 2 * m - 120) * (t / max(T - 1, 1))
    Y = lambda a: H - m - (H - 2 * m) * a / 100
    d.rectangle([m, m, W - m - 120, H - m], outline="black")
    for a in range(0, 101, 20):
        d.text((10, Y(a) - 7), f"{a}%", fill="black", font=font)
        d.line([m, Y(a), W - m - 120, Y(a)], fill=(225, 225, 225))
    for t in range(T):
        d.text((X(t) - 4, H - m + 6), str(t + 1), fill="black", font=font)
    d.text((W / 2 - 60, H - 22), "phase", fill="black", font=font)
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
              (227, 119, 194), (127, 127, 127), (188, 189, 34)]
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["method"], []).append(r)
    for k, (method, rs) in enumerate(groups.items()):
        c = colors[k % len(colors)]
        n = min(len(r["phase_accuracy"]) for r in rs)
        mean = [sum(r["phase_accuracy"][t] for r in rs) / len(rs) for t in range(n)]
        pts = [(X(t), Y(a)) for t, a in enumerate(mean)]
        d.line(pts, fill=c, width=2) if len(pts) > 1 else None
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
        avg = sum(r["avg_incremental_accuracy"] for r in rs) / len(rs)
        d.text((W - m - 110, m + 18 * k), f"{method} {avg:.1f}" + (f" ({len(rs)} runs)" if len(rs) > 1 else ""),
               fill=c, font=font)
    d.text((m, 15), "accuracy on all seen classes", fill="black", font=font)
    D.write_atomic(path, lambda tmp: img.save(tmp, format="PNG"))
