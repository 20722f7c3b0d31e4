"""The shapes world: procedural captioned images, and a checker that reads colour and shape back from pixels.

One coloured shape on a plain white background, 64 px by default, captions such as "a red circle" or
"a small blue square on the left". It is the offline stand-in for a caption data set: small enough that
micro-sd learns it on a CPU in minutes (the toy teacher, slimsd.toy.teacher), rich enough that "does the sample
follow its caption?" is a measurable question (:func:`caption_fidelity`), which is what the demo compares
across teacher, KD student and task-only student.

Every word of every caption is a whole word of the fixture tokenizer (scripts/make_tokenizer_fixture.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

BACKGROUND = (255, 255, 255)
# Well separated in RGB so that a blurry decoder output still lands on the right name.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 190),
    "cyan": (30, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.22, None: 0.32, "large": 0.44}  # half-extent of the shape as a fraction of the image
POSITIONS = {
    None: (0.5, 0.5),
    "left": (0.3, 0.5),
    "right": (0.7, 0.5),
    "top": (0.5, 0.3),
    "bottom": (0.5, 0.7),
}

# How often a caption names a size / a position (the rest are "a <colour> <shape>", centred, medium).
P_SIZE = 0.5
P_POSITION = 0.4


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str | None = None
    position: str | None = None

    @property
    def caption(self) -> str:
        words = ["a", *([self.size] if self.size else []), self.colour, self.shape]
        if self.position:
            words += ["on", "the", self.position]
        return " ".join(words)


def parse_caption(caption: str) -> Scene:
    """The scene a caption describes (colour and shape are required; size and position optional)."""
    words = caption.lower().replace(",", " ").split()
    colour = next((w for w in words if w in PALETTE), None)
    shape = next((w for w in words if w in SHAPES), None)
    if colour is None or shape is None:
        from slimsd.errors import SlimsdError

        raise SlimsdError(
            f"caption {caption!r} names no colour ({', '.join(PALETTE)}) or no shape ({', '.join(SHAPES)})"
        )
    size = next((w for w in words if w in SIZES), None)
    position = next((w for w in words if w in POSITIONS), None)
    return Scene(colour, shape, size, position)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":  # pointing up, base at the bottom
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "cross":
        a = r / 3
        return [
            (cx - a, cy - r),
            (cx + a, cy - r),
            (cx + a, cy - a),
            (cx + r, cy - a),
            (cx + r, cy + a),
            (cx + a, cy + a),
            (cx + a, cy + r),
            (cx - a, cy + r),
            (cx - a, cy + a),
            (cx - r, cy + a),
            (cx - r, cy - a),
            (cx - a, cy - a),
        ]
    return None  # circle: drawn as an ellipse


def render(scene: Scene, size: int = 64, jitter: tuple[float, float] = (0.0, 0.0)) -> Image.Image:
    """Draw one scene. ``jitter`` shifts the centre by a fraction of the image (data variety)."""
    # Supersample, then downsample: anti-aliased edges look like what a decoder produces.
    ss = 4
    big = size * ss
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    fx, fy = POSITIONS[scene.position]
    cx, cy = (fx + jitter[0]) * big, (fy + jitter[1]) * big
    r = SIZES[scene.size] * big * (0.7 if scene.position else 1.0)  # keep off-centre shapes inside the frame
    colour = PALETTE[scene.colour]
    poly = _shape_polygon(scene.shape, cx, cy, r)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(poly, fill=colour)
    return img.resize((size, size), Image.Resampling.LANCZOS)


# Colour x shape combinations that no training data shows: not the teacher's (VAE and U-Net), not the students',
# not any cache built from ``shapes:N``. One in six of the 24, each shape once and four different colours, so
# every held-out colour and every held-out shape is seen in other combinations: a model that follows them
# composes words it learned apart (compositional generalisation), the only claim "held-out" makes here.
HELD_OUT = frozenset({("red", "square"), ("green", "triangle"), ("blue", "cross"), ("yellow", "circle")})
SPLITS = ("seen", "held_out", "all")


def combinations(split: str = "seen") -> list[tuple[str, str]]:
    """The (colour, shape) pairs of a split: ``seen`` (training data), ``held_out`` or ``all``."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: allowed {', '.join(SPLITS)}")
    every = [(c, s) for c in PALETTE for s in SHAPES]
    if split == "all":
        return every
    return [p for p in every if (p in HELD_OUT) == (split == "held_out")]


def sample_scene(rng: random.Random, split: str = "seen") -> Scene:
    colour, shape = rng.choice(combinations(split))
    return Scene(
        colour=colour,
        shape=shape,
        size=rng.choice(["small", "large"]) if rng.random() < P_SIZE else None,
        position=rng.choice(["left", "right", "top", "bottom"]) if rng.random() < P_POSITION else None,
    )


def make_dataset(n: int, seed: int = 0, size: int = 64, split: str = "seen") -> list[tuple[Image.Image, str]]:
    """``n`` (image, caption) pairs of the shapes world; the same ``seed`` gives the same pairs. Every training
    set uses the default ``seen`` split; ``held_out`` images are for measuring (a VAE's reconstructions)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng, split)
        jitter = (rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04))
        out.append((render(scene, size, jitter), scene.caption))
    return out


def make_captions(n: int, seed: int = 0, split: str = "seen") -> list[str]:
    """``n`` captions of the shapes world (prompts for sampling a model) from ``split``, deterministic per seed.

    ``seen`` captions are fresh draws of the training combinations (the same caption text may occur in training
    data: 360 captions exist in all); ``held_out`` captions name only combinations no training set contains.
    """
    rng = random.Random(seed)
    return [sample_scene(rng, split).caption for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------
# The checker: colour and shape read back from pixels.

MASK_THRESHOLD = 80.0  # RGB distance from the background above which a pixel belongs to the shape
MIN_AREA = 0.01  # a foreground smaller than this fraction of the image is "no shape"
TEMPLATE = 16  # shapes are compared as TEMPLATE x TEMPLATE masks of their bounding box


def _templates() -> dict[str, np.ndarray]:
    out = {}
    for shape in SHAPES:
        img = render(Scene("blue", shape), size=64)
        out[shape] = _normalised_mask(_foreground(np.asarray(img, dtype=np.float32), np.array(BACKGROUND)))
    return out


def _foreground(pixels: np.ndarray, background: np.ndarray) -> np.ndarray:
    return np.linalg.norm(pixels - background, axis=-1) > MASK_THRESHOLD


def _normalised_mask(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    img = Image.fromarray(crop.astype(np.uint8) * 255).resize((TEMPLATE, TEMPLATE), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


_TEMPLATES: dict[str, np.ndarray] | None = None


def read_image(image: Image.Image) -> dict:
    """What the pixels show: ``{"colour", "shape", "area", "colour_purity", "shape_iou"}``.

    Background = median of the border pixels; foreground = pixels far from it. Colour = nearest palette
    colour to the foreground's median, or None when the median is far from every palette colour or when
    fewer than half the foreground pixels are near it (noise, mixed blobs). Shape = the template whose
    bounding-box mask overlaps the foreground's best (soft IoU), or None for an empty or frame-filling
    foreground.
    """
    global _TEMPLATES
    if _TEMPLATES is None:
        _TEMPLATES = _templates()
    px = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    background = np.median(border, axis=0)
    mask = _foreground(px, background)
    area = float(mask.mean())
    result = {"colour": None, "shape": None, "area": area, "colour_purity": 0.0, "shape_iou": 0.0}
    if area < MIN_AREA or area > 0.9:
        return result
    fg = px[mask]
    median = np.median(fg, axis=0)
    names = list(PALETTE)
    colours = np.array([PALETTE[c] for c in names], dtype=np.float32)
    dist = np.linalg.norm(colours - median, axis=1)
    best = int(dist.argmin())
    purity = float((np.linalg.norm(fg - colours[best], axis=1) < 90.0).mean())
    result["colour_purity"] = purity
    if dist[best] < 90.0 and purity >= 0.5:
        result["colour"] = names[best]
    m = _normalised_mask(mask)
    ious = {
        s: float(np.minimum(m, t).sum() / max(np.maximum(m, t).sum(), 1e-6)) for s, t in _TEMPLATES.items()
    }
    shape = max(ious, key=ious.get)
    result["shape_iou"] = ious[shape]
    if ious[shape] >= 0.5:
        result["shape"] = shape
    return result


def caption_fidelity(images: list[Image.Image], captions: list[str], details: bool = False):
    """Fraction of images whose colour AND shape (read from pixels) match their caption.

    Returns a float, or with ``details=True`` a dict: ``fidelity``, ``colour_accuracy``,
    ``shape_accuracy``, ``n`` and ``per_image`` (the caption, what was read, and whether each matched).
    Chance level on the shapes world is 1/len(PALETTE) for colour, 1/len(SHAPES) for shape, their product
    for both.
    """
    if len(images) != len(captions):
        from slimsd.errors import SlimsdError

        raise SlimsdError(
            f"{len(images)} images but {len(captions)} captions: one caption per image is needed"
        )
    per_image = []
    for image, caption in zip(images, captions, strict=True):
        want = parse_caption(caption)
        got = read_image(image)
        per_image.append(
            {
                "caption": caption,
                **got,
                "colour_ok": got["colour"] == want.colour,
                "shape_ok": got["shape"] == want.shape,
            }
        )
    n = max(len(per_image), 1)
    colour_acc = sum(p["colour_ok"] for p in per_image) / n
    shape_acc = sum(p["shape_ok"] for p in per_image) / n
    fidelity = sum(p["colour_ok"] and p["shape_ok"] for p in per_image) / n
    if not details:
        return fidelity
    return {
        "fidelity": fidelity,
        "colour_accuracy": colour_acc,
        "shape_accuracy": shape_acc,
        "n": len(per_image),
        "per_image": per_image,
    }
