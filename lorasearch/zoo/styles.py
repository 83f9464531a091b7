"""Deterministic style transforms grouped into genres.

Styles in one genre share a transform and differ in its parameters. Some genres
are easy for image statistics (palettes recolour everything), others are not
(hatching, ink and dithering keep the content's colours and differ only in
texture, stroke orientation or line weight over varied content).
All transforms map a float (32, 32, 3) image in [0, 1] to the same.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage

Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Style:
    """One style: a genre's transform with fixed parameters.

    Attributes:
        genre: the genre name.
        name: the style name (unique within its genre).
        params: the transform's keyword arguments.
        fn: the genre transform.
    """

    genre: str
    name: str
    params: dict[str, object] = field(hash=False)
    fn: Callable[..., np.ndarray] = field(hash=False, repr=False)

    @property
    def key(self) -> str:
        """``genre/name``."""
        return f"{self.genre}/{self.name}"

    def __call__(self, img: np.ndarray) -> np.ndarray:
        return np.clip(self.fn(img, **self.params), 0.0, 1.0).astype(np.float32)


def luminance(img: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of an RGB image."""
    return img @ np.asarray([0.299, 0.587, 0.114], np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32), indexing="xy")


def palette_map(img: np.ndarray, stops: tuple[tuple[float, float, float], ...]) -> np.ndarray:
    """Recolour by luminance through a piecewise-linear palette (gradient map)."""
    lum = luminance(img)
    pos = np.linspace(0.0, 1.0, len(stops))
    stops_arr = np.asarray(stops, np.float32)
    return np.stack([np.interp(lum, pos, stops_arr[:, c]) for c in range(3)], axis=-1)


def hatch(img: np.ndarray, angles: tuple[float, ...], spacing: float, strength: float = 0.8) -> np.ndarray:
    """Pale the colours, then darken with parallel strokes where the image is dark.

    Each angle adds one family of strokes, the second one only in darker areas
    (cross-hatching), so tone becomes stroke density.
    """
    x, y = _grid(img.shape[0])
    lum = luminance(img)
    out = 0.55 * img + 0.45
    for i, deg in enumerate(angles):
        t = np.deg2rad(deg)
        phase = (x * np.cos(t) + y * np.sin(t)) / spacing
        line = np.abs(phase - np.round(phase)) < 0.22
        dark = lum < (0.75 - 0.25 * i)
        out = out * (1 - strength * (line & dark))[..., None]
    return out


def pixelate(img: np.ndarray, block: int, levels: int) -> np.ndarray:
    """Block-average to ``size/block`` pixels, quantise each channel to ``levels``, upsample."""
    s = img.shape[0]
    small = img.reshape(s // block, block, s // block, block, 3).mean(axis=(1, 3))
    q = np.round(small * (levels - 1)) / (levels - 1)
    return q.repeat(block, axis=0).repeat(block, axis=1)


def ink(img: np.ndarray, width: int, fill: float, threshold: float = 0.12) -> np.ndarray:
    """Black outlines on edges of the luma, over colours flattened towards paper by ``fill``."""
    lum = ndimage.gaussian_filter(luminance(img), 0.6)
    mag = np.hypot(ndimage.sobel(lum, 0), ndimage.sobel(lum, 1))
    edges = mag > threshold * mag.max() if mag.max() > 0.05 else np.zeros_like(mag, bool)
    if width > 1:
        edges = ndimage.binary_dilation(edges, iterations=width - 1)
    flat = pixelate(img, 1, 5)
    paper = np.asarray([0.97, 0.95, 0.9], np.float32)
    out = (1 - fill) * flat + fill * paper
    return np.where(edges[..., None], 0.05, out)


def _bayer(n: int) -> np.ndarray:
    """The n x n Bayer threshold matrix (n a power of two), values in (0, 1)."""
    m = np.zeros((1, 1))
    while m.shape[0] < n:
        m = np.block([[4 * m, 4 * m + 2], [4 * m + 3, 4 * m + 1]])
    return (m + 0.5) / m.size


def _threshold_map(kind: str, size: int) -> np.ndarray:
    """A fixed threshold pattern: Bayer 2/4, a 45-degree halftone screen or a seeded noise field."""
    if kind.startswith("bayer"):
        n = int(kind[5:])
        return np.tile(_bayer(n), (size // n, size // n))
    if kind == "halftone":
        x, y = _grid(size)
        u, v = (x + y) / np.sqrt(2) / 4.0, (x - y) / np.sqrt(2) / 4.0
        d = np.hypot(u - np.round(u), v - np.round(v)) / 0.7071
        return np.clip(d, 0.0, 1.0)
    return np.random.default_rng(1234).random((size, size))


def dither(img: np.ndarray, pattern: str, levels: int = 2) -> np.ndarray:
    """Ordered dithering of each channel to ``levels`` against a fixed threshold pattern."""
    thr = _threshold_map(pattern, img.shape[0])[..., None]
    scaled = img * (levels - 1)
    return (np.floor(scaled) + (scaled - np.floor(scaled) > thr)) / (levels - 1)


def watercolour(img: np.ndarray, sigma: float, grain: float, edge: float = 0.35) -> np.ndarray:
    """Blur, darken where the blurred tone changes (pigment pooling), multiply a fixed paper grain."""
    soft = np.stack([ndimage.gaussian_filter(img[..., c], sigma) for c in range(3)], axis=-1)
    lum = luminance(soft)
    pool = np.hypot(ndimage.sobel(lum, 0), ndimage.sobel(lum, 1))
    paper = ndimage.gaussian_filter(np.random.default_rng(4321).random(lum.shape), 0.7)
    paper = (paper - paper.mean()) / (paper.std() + 1e-6)
    out = soft * (1 - edge * np.clip(pool, 0, 1))[..., None]
    return (0.15 + 0.85 * out) * (1 + grain * paper)[..., None]


PALETTES = {
    "sepia": ((0.15, 0.08, 0.03), (0.6, 0.42, 0.25), (0.98, 0.92, 0.78)),
    "ocean": ((0.02, 0.05, 0.25), (0.05, 0.5, 0.6), (0.85, 0.97, 1.0)),
    "sunset": ((0.25, 0.02, 0.3), (0.9, 0.35, 0.2), (1.0, 0.9, 0.4)),
    "forest": ((0.02, 0.15, 0.05), (0.35, 0.6, 0.15), (0.9, 1.0, 0.7)),
}

GENRES: dict[str, list[Style]] = {
    "palette": [Style("palette", k, {"stops": v}, palette_map) for k, v in PALETTES.items()],
    "hatching": [
        Style("hatching", "horizontal", {"angles": (90.0,), "spacing": 3.0}, hatch),
        Style("hatching", "diagonal", {"angles": (45.0,), "spacing": 3.0}, hatch),
        Style("hatching", "cross", {"angles": (45.0, 135.0), "spacing": 3.0}, hatch),
        Style("hatching", "wide-vertical", {"angles": (0.0,), "spacing": 5.0}, hatch),
    ],
    "pixel": [
        Style("pixel", "b2-l4", {"block": 2, "levels": 4}, pixelate),
        Style("pixel", "b4-l4", {"block": 4, "levels": 4}, pixelate),
        Style("pixel", "b2-l2", {"block": 2, "levels": 2}, pixelate),
        Style("pixel", "b4-l3", {"block": 4, "levels": 3}, pixelate),
    ],
    "ink": [
        Style("ink", "thin-colour", {"width": 1, "fill": 0.2}, ink),
        Style("ink", "thick-colour", {"width": 3, "fill": 0.2}, ink),
        Style("ink", "thin-paper", {"width": 1, "fill": 0.85}, ink),
        Style("ink", "thick-paper", {"width": 3, "fill": 0.85}, ink),
    ],
    "dither": [
        Style("dither", "bayer2", {"pattern": "bayer2"}, dither),
        Style("dither", "bayer4", {"pattern": "bayer4"}, dither),
        Style("dither", "halftone", {"pattern": "halftone"}, dither),
        Style("dither", "noise", {"pattern": "noise"}, dither),
    ],
    "watercolour": [
        Style("watercolour", "soft", {"sigma": 0.8, "grain": 0.05}, watercolour),
        Style("watercolour", "wet", {"sigma": 1.6, "grain": 0.05}, watercolour),
        Style("watercolour", "grainy", {"sigma": 0.8, "grain": 0.18}, watercolour),
        Style("watercolour", "wet-grainy", {"sigma": 1.6, "grain": 0.18}, watercolour),
    ],
}


def select_styles(genres: int, styles_per_genre: int) -> list[Style]:
    """The first ``genres`` genres (in ``GENRES`` order) and their first ``styles_per_genre`` styles.

    Args:
        genres: number of genres (at most ``len(GENRES)``).
        styles_per_genre: styles per genre (at most 4).

    Returns:
        the Styles, genre-major.
    """
    names = list(GENRES)
    if not 1 <= genres <= len(names):
        raise ValueError(f"genres must be 1..{len(names)}, got {genres}")
    if not 1 <= styles_per_genre <= min(len(v) for v in GENRES.values()):
        raise ValueError(f"styles per genre must be 1..4, got {styles_per_genre}")
    return [s for g in names[:genres] for s in GENRES[g][:styles_per_genre]]


def apply_all(style: Style, images: np.ndarray) -> np.ndarray:
    """``style`` applied to a stack (N, 32, 32, 3)."""
    return np.stack([style(im) for im in images])


