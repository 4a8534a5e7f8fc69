"""A procedural captioned data set: one coloured shape per image, with a caption.

Each image shows a circle, square or triangle in red, green, blue or yellow, small or large,
in one of the four quadrants, on a black background; its caption reads e.g.
"a small red circle at the top left". Everything is a function of the seed, so no files are
needed. Shapes are rasterised at 4x the resolution and box-filtered (anti-aliased edges).

To test composition, some colour x shape pairs (:data:`HELD_OUT_PAIRS`) never appear in the
training split; the "test" split holds exactly those pairs (every size and position), so a
model can be asked for "a red triangle" having seen red things and triangles but never a
red triangle.

For fine-tuning benchmarks the renderer also knows a shape and a colour the data set never
draws (:data:`NEW_SHAPES`, :data:`NEW_COLOURS`; indices continue after the data set's own, see
:data:`ALL_SHAPES`, :data:`ALL_COLOURS`); :func:`load_shape_variants` draws images from any
choice of attribute values, and :func:`render` can move centres beyond the training jitter.
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
#: shapes and colours that :func:`load_shapes` never draws (a model trained on the data set has
#: not seen them); their indices follow the data set's in :data:`ALL_SHAPES` / :data:`ALL_COLOURS`
NEW_SHAPES: tuple[str, ...] = ("plus",)
NEW_COLOURS: dict[str, tuple[float, float, float]] = {"purple": (0.7, 0.0, 1.0)}
ALL_SHAPES: tuple[str, ...] = SHAPES + NEW_SHAPES
ALL_COLOURS: dict[str, tuple[float, float, float]] = {**COLOURS, **NEW_COLOURS}
#: the training data's centre jitter: up to this fraction of the side either way
JITTER = 1 / 16


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
    """"a {size} {colour} {shape} at the {position}" for attribute indices (into
    :data:`ALL_SHAPES` and :data:`ALL_COLOURS`, so the new shape and colour have captions)."""
    return (f"a {list(SIZES)[size]} {list(ALL_COLOURS)[colour]} {ALL_SHAPES[shape]} "
            f"at the {POSITIONS[position]}")


def parse_caption(text: str) -> tuple[int, int, int, int]:
    """Inverse of :func:`caption`: (shape, colour, size, position) indices."""
    words = text.split()
    if len(words) < 7 or words[0] != "a" or words[4:6] != ["at", "the"]:
        raise ValueError(f"not a shapes caption: {text!r}")
    if words[3] not in ALL_SHAPES or words[2] not in ALL_COLOURS:
        raise ValueError(f"not a shapes caption: {text!r}")
    return (ALL_SHAPES.index(words[3]), list(ALL_COLOURS).index(words[2]),
            list(SIZES).index(words[1]),
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
    if ALL_SHAPES[shape] == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif ALL_SHAPES[shape] == "square":  # same area as the circle: half-side r sqrt(pi) / 2
        half = r * 0.886
        inside = (dx.abs() <= half) & (dy.abs() <= half)
    elif ALL_SHAPES[shape] == "plus":  # two bars 2.2 r x 0.8 r: area 2.88 r^2 (circle 3.14)
        arm, half = 1.1 * r, 0.4 * r
        inside = (((dx.abs() <= arm) & (dy.abs() <= half))
                  | ((dx.abs() <= half) & (dy.abs() <= arm)))
    else:  # upward triangle inscribed in the circle of radius 1.15 r
        rr = 1.15 * r
        top, base = -rr, rr * 0.5
        inside = (dy <= base) & (dx.abs() <= (dy - top) / (base - top) * rr * 0.866)
    return inside.float()


def coverage(attrs: Tensor, resolution: int, generator: torch.Generator,
             jitter: tuple[float, float] = (0.0, JITTER)) -> Tensor:
    """Anti-aliased coverage masks [B, 1, R, R] in [0, 1] of the shapes of attribute rows
    [B, 4] (shape indices into :data:`ALL_SHAPES`), with the centre jitter and the radius
    jitter (+-10%) drawn from ``generator``.

    ``jitter`` (lo, hi): each centre coordinate moves by a random sign times a magnitude
    uniform in [lo, hi], as fractions of the side; the default (0, :data:`JITTER`) is the data
    set's, and e.g. (JITTER, 0.11) puts every centre where no training image has one."""
    lo, hi = jitter
    if not 0 <= lo <= hi:
        raise ValueError(f"jitter must be 0 <= lo <= hi, got {jitter!r}")
    n = resolution * SUPERSAMPLE
    b = len(attrs)
    u = torch.rand(b, 2, generator=generator) * 2 - 1
    offset = u * hi * n if lo == 0 else u.sign() * (lo + u.abs() * (hi - lo)) * n
    scale = 1 + (torch.rand(b, generator=generator) * 2 - 1) * 0.1
    col, row = attrs[:, 3] % 2, attrs[:, 3] // 2
    cx = (col.float() * 0.5 + 0.25) * n + offset[:, 0]
    cy = (row.float() * 0.5 + 0.25) * n + offset[:, 1]
    radius = torch.tensor(list(SIZES.values()))[attrs[:, 2]] * n * scale
    masks = torch.zeros(b, n, n)
    for s in range(len(ALL_SHAPES)):
        sel = attrs[:, 0] == s
        if sel.any():
            masks[sel] = _mask(s, cx[sel], cy[sel], radius[sel], n)
    return F.avg_pool2d(masks[:, None], SUPERSAMPLE)


def render(attrs: Tensor, resolution: int, generator: torch.Generator,
           jitter: tuple[float, float] = (0.0, JITTER)) -> Tensor:
    """Images [B, 3, R, R] in [-1, 1] for attribute rows [B, 4] (indices into
    :data:`ALL_SHAPES` and :data:`ALL_COLOURS`): the :func:`coverage` mask times the colour
    on black."""
    cover = coverage(attrs, resolution, generator, jitter)  # [B, 1, R, R]
    rgb = torch.tensor(list(ALL_COLOURS.values()))[attrs[:, 1]][:, :, None, None]  # [B, 3, 1, 1]
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


def load_shape_variants(n: int, seed: int = 0, resolution: int = 16, *,
                        shapes: tuple[str, ...] = SHAPES,
                        colours: tuple[str, ...] = tuple(COLOURS),
                        sizes: tuple[str, ...] = tuple(SIZES),
                        positions: tuple[str, ...] = POSITIONS,
                        jitter: tuple[float, float] = (0.0, JITTER)) -> CaptionedImageData:
    """``n`` captioned images drawn uniformly from the named attribute values (any of
    :data:`ALL_SHAPES`, :data:`ALL_COLOURS`, :data:`SIZES`, :data:`POSITIONS`; no held-out
    split applies), deterministic in ``seed``. E.g. ``colours=("purple",)`` gives the new
    colour on every shape; ``attributes`` index the ``ALL_*`` vocabularies."""
    if isinstance(resolution, bool) or resolution < 8 or resolution % 8:
        raise DataError(f"invalid resolution {resolution!r} for the shapes dataset: must be a "
                        f"positive multiple of 8")
    if n < 1:
        raise DataError(f"shapes dataset needs n >= 1, got {n}")
    vocab = (ALL_SHAPES, tuple(ALL_COLOURS), tuple(SIZES), POSITIONS)
    chosen = []
    for name, values, known in zip(("shapes", "colours", "sizes", "positions"),
                                   (shapes, colours, sizes, positions), vocab, strict=True):
        unknown = [v for v in values if v not in known]
        if not values or unknown:
            raise DataError(f"{name} must be a non-empty choice of {list(known)}, got "
                            f"{list(values)!r}")
        chosen.append(torch.tensor([known.index(v) for v in values]))
    g = torch.Generator().manual_seed(seed)
    attrs = torch.stack([c[torch.randint(len(c), (n,), generator=g)] for c in chosen], dim=1)
    images = render(attrs, resolution, g, jitter)
    caps = [caption(*map(int, row)) for row in attrs]
    names = sorted(set(caps))
    index = {c: i for i, c in enumerate(names)}
    labels = torch.tensor([index[c] for c in caps])
    return CaptionedImageData(images.contiguous(), labels, names, attributes=attrs)
