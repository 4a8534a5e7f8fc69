"""A procedural captioned data set: one coloured shape per image, with a caption.

Each image shows a circle, square or triangle in red, green, blue or yellow, small or large,
in one of the four quadrants, on a black background; its caption reads e.g.
"a small red circle at the top left". Everything is a function of the seed, so no files are
needed. Shapes are rasterised at 4x the resolution and box-filtered (anti-aliased edges).

To test composition, some colour x shape pairs (:data:`HELD_OUT_PAIRS`) never appear in the
training split; the "test" split holds exactly those pairs (every size and position), so a
model can be asked for "a red triangle" having seen red things and triangles but never a
red triangle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import DataError, ImageData, check_split

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: name -> RGB in [0, 1]
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 0.8, 0.0), "blue": (0.1, 0.2, 1.0),
    "yellow": (1.0, 0.9, 0.0),
}
SIZES: dict[str, float] = {"small": 0.14, "large": 0.23}  # radius as a fraction of the side
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
#: (colour, shape) pairs kept out of the training split
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "circle"), ("blue", "square")})
SUPERSAMPLE = 4


@dataclass
class CaptionedImageData(ImageData):
    """:class:`ImageData` whose labels index captions: ``class_names[labels[i]]`` is image
    i's caption. ``attributes`` ``[N, 4]`` holds (shape, colour, size, position) indices into
    :data:`SHAPES`, the keys of :data:`COLOURS`, of :data:`SIZES`, and :data:`POSITIONS`."""

    attributes: Tensor = field(default_factory=lambda: torch.zeros(0, 4, dtype=torch.long))

    @property
    def captions(self) -> list[str]:
        """The caption of every image."""
        assert self.labels is not None
        return [self.class_names[i] for i in self.labels.tolist()]


def caption(shape: int, colour: int, size: int, position: int) -> str:
    """"a {size} {colour} {shape} at the {position}" for attribute indices."""
    return (f"a {list(SIZES)[size]} {list(COLOURS)[colour]} {SHAPES[shape]} "
            f"at the {POSITIONS[position]}")


def parse_caption(text: str) -> tuple[int, int, int, int]:
    """Inverse of :func:`caption`: (shape, colour, size, position) indices."""
    words = text.split()
    if len(words) < 7 or words[0] != "a" or words[4:6] != ["at", "the"]:
        raise ValueError(f"not a shapes caption: {text!r}")
    return (SHAPES.index(words[3]), list(COLOURS).index(words[2]), list(SIZES).index(words[1]),
            POSITIONS.index(" ".join(words[6:])))


def combinations(split: str) -> list[tuple[int, int, int, int]]:
    """All (shape, colour, size, position) index tuples of a split, in a fixed order."""
    check_split(split, 0.5)
    out = []
    for s in range(len(SHAPES)):
        for c, colour in enumerate(COLOURS):
            held = (colour, SHAPES[s]) in HELD_OUT_PAIRS
            if (split == "train" and held) or (split == "test" and not held):
                continue
            out += [(s, c, z, p) for z in range(len(SIZES)) for p in range(len(POSITIONS))]
    return out


def _mask(shape: int, cx: Tensor, cy: Tensor, r: Tensor, n: int) -> Tensor:
    """Coverage masks [B, n, n] of shapes centred at (cx, cy) with radius r (pixel units)."""
    coords = torch.arange(n, dtype=torch.float32) + 0.5
    yy, xx = coords[:, None], coords[None, :]
    dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
    r = r[:, None, None]
    if SHAPES[shape] == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif SHAPES[shape] == "square":  # same area as the circle: half-side r sqrt(pi) / 2
        half = r * 0.886
        inside = (dx.abs() <= half) & (dy.abs() <= half)
    else:  # upward triangle inscribed in the circle of radius 1.15 r
        rr = 1.15 * r
        top, base = -rr, rr * 0.5
        inside = (dy <= base) & (dx.abs() <= (dy - top) / (base - top) * rr * 0.866)
    return inside.float()


def render(attrs: Tensor, resolution: int, generator: torch.Generator) -> Tensor:
    """Images [B, 3, R, R] in [-1, 1] for attribute rows [B, 4], with random jitter of the
    centre (+-1/16 of the side) and the radius (+-10%) drawn from ``generator``."""
    n = resolution * SUPERSAMPLE
    b = len(attrs)
    jitter = (torch.rand(b, 2, generator=generator) * 2 - 1) * n / 16
    scale = 1 + (torch.rand(b, generator=generator) * 2 - 1) * 0.1
    col, row = attrs[:, 3] % 2, attrs[:, 3] // 2
    cx = (col.float() * 0.5 + 0.25) * n + jitter[:, 0]
    cy = (row.float() * 0.5 + 0.25) * n + jitter[:, 1]
    radius = torch.tensor(list(SIZES.values()))[attrs[:, 2]] * n * scale
    masks = torch.zeros(b, n, n)
    for s in range(len(SHAPES)):
        sel = attrs[:, 0] == s
        if sel.any():
            masks[sel] = _mask(s, cx[sel], cy[sel], radius[sel], n)
    cover = F.avg_pool2d(masks[:, None], SUPERSAMPLE)  # [B, 1, R, R] in [0, 1]
    rgb = torch.tensor(list(COLOURS.values()))[attrs[:, 1]][:, :, None, None]  # [B, 3, 1, 1]
    return (cover * rgb) * 2 - 1


def load_shapes(resolution: int = 16, split: str = "train", n: int = 4096,
                seed: int = 0) -> CaptionedImageData:
    """``n`` captioned shape images of a split, deterministic in ``seed``.

    Args:
        resolution: side length, a multiple of 8 (16 is the intended size).
        split: "train" (every combination except :data:`HELD_OUT_PAIRS`; "all" is the same,
            so that training never sees held-out pairs) or "test" (only held-out pairs).
        n: number of images; combinations are drawn uniformly.
        seed: seed of the combinations and the jitter.

    Returns:
        :class:`CaptionedImageData`; ``class_names`` are the split's captions (sorted) and
        ``labels`` index them.
    """
    if isinstance(resolution, bool) or resolution < 8 or resolution % 8:
        raise DataError(f"invalid resolution {resolution!r} for the shapes dataset: must be a "
                        f"positive multiple of 8")
    if n < 1:
        raise DataError(f"shapes dataset needs n >= 1, got {n}")
    combos = torch.tensor(combinations("train" if split == "all" else split))
    g = torch.Generator().manual_seed(seed)
    attrs = combos[torch.randint(len(combos), (n,), generator=g)]
    images = render(attrs, resolution, g)
    names = sorted({caption(*map(int, row)) for row in combos})
    index = {c: i for i, c in enumerate(names)}
    labels = torch.tensor([index[caption(*map(int, row))] for row in attrs])
    return CaptionedImageData(images.contiguous(), labels, names, attributes=attrs)
