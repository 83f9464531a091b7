"""Procedural content for the zoo: captioned 32x32 RGB scenes shared by every style.

Each image is drawn from a seeded generator (shapes, scenes, gradients, stripes,
checkers and crops of scikit-learn's two sample photos) and carries a short
caption over a small vocabulary, which the zoo's text conditioning embeds.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SIZE = 32
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.15, 0.15), "green": (0.2, 0.7, 0.25), "blue": (0.15, 0.3, 0.85),
    "yellow": (0.95, 0.85, 0.2), "purple": (0.55, 0.2, 0.7), "orange": (0.95, 0.55, 0.1),
    "white": (0.95, 0.95, 0.95), "black": (0.08, 0.08, 0.08), "grey": (0.5, 0.5, 0.5),
    "cyan": (0.2, 0.8, 0.85),
}
KINDS = ("circle", "square", "triangle", "ring", "stripes", "checker", "gradient", "scene", "photo")
VOCAB: tuple[str, ...] = ("<pad>", "a", "on", "and", "with", *COLOURS, *KINDS, "sky", "ground", "sun",
                          "horizontal", "vertical", "diagonal", "small", "large", "flower", "temple")


@dataclass(frozen=True)
class Content:
    """One rendered image and its caption.

    Attributes:
        image: float32 array (32, 32, 3) in [0, 1].
        caption: words from ``VOCAB``.
    """

    image: np.ndarray
    caption: str


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1]."""
    c = (np.arange(SIZE) + 0.5) / SIZE
    return np.meshgrid(c, c, indexing="xy")


def _pick(rng: np.random.Generator, names: list[str], avoid: str | None = None) -> str:
    pool = [n for n in names if n != avoid]
    return pool[int(rng.integers(len(pool)))]


def _fill(mask: np.ndarray, img: np.ndarray, colour: str) -> np.ndarray:
    return np.where(mask[..., None], np.asarray(COLOURS[colour], np.float32), img)


def _shape(rng: np.random.Generator, kind: str) -> Content:
    """A filled circle/square/triangle/ring on a plain background."""
    bg = _pick(rng, list(COLOURS))
    fg = _pick(rng, list(COLOURS), avoid=bg)
    x, y = _grid()
    cx, cy = rng.uniform(0.3, 0.7, 2)
    r = rng.uniform(0.15, 0.35)
    if kind == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 < r**2
    elif kind == "ring":
        d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        mask = (d < r) & (d > r * 0.55)
    elif kind == "square":
        mask = (np.abs(x - cx) < r * 0.85) & (np.abs(y - cy) < r * 0.85)
    else:  # triangle pointing up
        mask = (y < cy + r) & (y > cy - r) & (np.abs(x - cx) < (y - (cy - r)) * 0.6)
    img = np.broadcast_to(np.asarray(COLOURS[bg], np.float32), (SIZE, SIZE, 3))
    size = "large" if r > 0.25 else "small"
    return Content(_fill(mask, img, fg), f"a {size} {fg} {kind} on {bg}")


def _pattern(rng: np.random.Generator, kind: str) -> Content:
    """Stripes, checkers and two-colour gradients."""
    a = _pick(rng, list(COLOURS))
    b = _pick(rng, list(COLOURS), avoid=a)
    x, y = _grid()
    ca, cb = np.asarray(COLOURS[a], np.float32), np.asarray(COLOURS[b], np.float32)
    if kind == "gradient":
        direction = ("horizontal", "vertical", "diagonal")[int(rng.integers(3))]
        t = {"horizontal": x, "vertical": y, "diagonal": (x + y) / 2}[direction]
        img = ca * (1 - t[..., None]) + cb * t[..., None]
        return Content(img.astype(np.float32), f"a {direction} gradient {a} and {b}")
    period = rng.uniform(0.12, 0.3)
    if kind == "stripes":
        direction = ("horizontal", "vertical", "diagonal")[int(rng.integers(3))]
        t = {"horizontal": y, "vertical": x, "diagonal": x + y}[direction]
        mask = (t / period) % 1.0 < 0.5
        cap = f"a {direction} stripes {a} and {b}"
    else:
        mask = ((x / period).astype(int) + (y / period).astype(int)) % 2 == 0
        cap = f"a checker {a} and {b}"
    return Content(np.where(mask[..., None], ca, cb).astype(np.float32), cap)


def _scene(rng: np.random.Generator) -> Content:
    """Sky, ground with a wavy horizon, and a sun."""
    sky = _pick(rng, ["blue", "cyan", "orange", "purple", "grey"])
    ground = _pick(rng, ["green", "yellow", "grey", "black", "orange"], avoid=sky)
    x, y = _grid()
    h = rng.uniform(0.5, 0.75) + 0.05 * np.sin(x * rng.uniform(4, 12) + rng.uniform(0, 6))
    t = y[..., None]
    img = np.asarray(COLOURS[sky], np.float32) * (1.1 - 0.4 * t)
    img = np.where((y > h)[..., None], np.asarray(COLOURS[ground], np.float32) * (1.2 - 0.4 * t), img)
    sx, sy, sr = rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.35), rng.uniform(0.06, 0.12)
    img = _fill((x - sx) ** 2 + (y - sy) ** 2 < sr**2, img, "yellow")
    return Content(np.clip(img, 0, 1).astype(np.float32), f"a scene {sky} sky and {ground} ground with sun")


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """scikit-learn's two bundled photos (china, flower) as float arrays; empty when unavailable."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        return ()
    return tuple(np.asarray(im, np.float32) / 255.0 for im in load_sample_images().images)


def _photo(rng: np.random.Generator) -> Content:
    """A random crop of a sample photo, downsampled by block averaging."""
    photos = _photos()
    if not photos:
        return _scene(rng)
    which = int(rng.integers(len(photos)))
    img = photos[which]
    scale = int(rng.integers(2, 7))
    side = SIZE * scale
    top = int(rng.integers(img.shape[0] - side))
    left = int(rng.integers(img.shape[1] - side))
    crop = img[top:top + side, left:left + side].reshape(SIZE, scale, SIZE, scale, 3).mean(axis=(1, 3))
    return Content(crop.astype(np.float32), f"a photo {('temple', 'flower')[which]}")


def render(seed: int) -> Content:
    """One captioned image, a pure function of ``seed``.

    Args:
        seed: the image's seed.

    Returns:
        the Content.
    """
    rng = np.random.default_rng([seed, 0x20C0])
    kind = KINDS[int(rng.integers(len(KINDS)))]
    if kind in ("circle", "square", "triangle", "ring"):
        return _shape(rng, kind)
    if kind in ("stripes", "checker", "gradient"):
        return _pattern(rng, kind)
    return _scene(rng) if kind == "scene" else _photo(rng)


def content_pool(n: int, seed: int = 0) -> list[Content]:
    """The shared pool of ``n`` images every style is applied to.

    Args:
        n: pool size.
        seed: pool seed (image i uses ``seed * 1_000_003 + i``).

    Returns:
        the Contents.
    """
    return [render(seed * 1_000_003 + i) for i in range(n)]


def tokenize(caption: str, length: int = 8) -> list[int]:
    """Word ids of ``caption`` over ``VOCAB``, truncated/padded to ``length`` (unknown words dropped)."""
    index = {w: i for i, w in enumerate(VOCAB)}
    ids = [index[w] for w in caption.split() if w in index][:length]
    return ids + [0] * (length - len(ids))
