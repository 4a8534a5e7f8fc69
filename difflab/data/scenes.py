"""A procedural 64 x 64 scene data set: a large shape among small ones on a textured background.

Each image shows one large *main object* (a circle, square or triangle in red, green, blue or
yellow: the 12 classes, named e.g. "red circle"), one to three small *distractors* (any shape,
in palette colours other than the main object's) at random non-overlapping positions, and a
textured background of one of four kinds (stripes at an angle, checks, smooth noise, dots) in
two muted colours: low-chroma colours (``max - min`` of RGB at most :data:`MAX_BACKGROUND_CHROMA`)
that can never be taken for a palette colour. Captions read e.g. "a large red circle with two
small objects on a striped background".

The shapes' rasteriser and palette are those of :mod:`difflab.data.shapes` (each object is
rasterised at 4x in its own bounding box and box-filtered, so edges are anti-aliased; the
background's edges are smoothed analytically). A scene is drawn as resolution-free parameters
(:func:`sample_scenes`), then rendered at any resolution (:func:`render_scenes`): the same seed
gives the same scenes at 16 and at 64 px. Images of a split are the only ones rendered.

:func:`load_scenes` gives class labels (``"scenes"`` in the registry: class-conditional
training) or, with ``captions=True``, a :class:`CaptionedImageData` whose labels index the
captions (``"scenes:captions"``: text conditioning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import DataError, ImageData, check_split, split_indices
from .shapes import COLOURS, SHAPES, SUPERSAMPLE, CaptionedImageData, _mask

#: background kinds and their caption adjectives
BACKGROUNDS: tuple[str, ...] = ("striped", "checked", "mottled", "dotted")
#: class names, ``label = shape * len(COLOURS) + colour``
CLASS_NAMES: list[str] = [f"{c} {s}" for s in SHAPES for c in COLOURS]
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three")
MAX_DISTRACTORS = 3
MAIN_RADIUS = 0.17         # radius as a fraction of the side, +-10%
DISTRACTOR_RADIUS = 0.07   # likewise
BOUND = 1.26               # bounding-circle radius / radius (the square's corner: 0.886 sqrt 2)
GAP = 0.03                 # least gap between bounding circles, fraction of the side
MAX_BACKGROUND_CHROMA = 0.3
DEFAULT_SIZE = 7500        # images of split "all"; train 6000 at test_fraction 0.2
_CANDIDATES = 32           # candidate positions per distractor (rejection sampling)
_NOISE_GRID = 5            # side of the random grid the mottled background is upsampled from
_CHUNK = 512               # images rendered at once (bounds the memory of the 4x masks)


@dataclass
class Scenes:
    """Resolution-free scene parameters of ``N`` images; lengths are fractions of the side.

    Objects are indexed 0 (the main object) to :data:`MAX_DISTRACTORS` (distractors);
    ``present[:, 0]`` is always True.
    """

    shape: Tensor        # [N, 4] long, index into SHAPES
    colour: Tensor       # [N, 4] long, index into COLOURS
    centre: Tensor       # [N, 4, 2] (x, y) in (0, 1)
    radius: Tensor       # [N, 4]
    present: Tensor      # [N, 4] bool
    background: Tensor   # [N] long, index into BACKGROUNDS
    bg_colours: Tensor   # [N, 2, 3] RGB in [0, 1], muted
    angle: Tensor        # [N] radians (stripes, checks, dots)
    period: Tensor       # [N] fraction of the side
    phase: Tensor        # [N, 2] in [0, 1)
    noise: Tensor        # [N, G, G] in [0, 1] (mottled)

    def __len__(self) -> int:
        return int(self.shape.shape[0])

    def select(self, index: Tensor) -> Scenes:
        """The scenes at ``index``."""
        return Scenes(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @property
    def labels(self) -> Tensor:
        """Class index of every scene's main object: ``shape * len(COLOURS) + colour``."""
        return self.shape[:, 0] * len(COLOURS) + self.colour[:, 0]

    @property
    def distractors(self) -> Tensor:
        """Number of distractors [N] (1 to :data:`MAX_DISTRACTORS`)."""
        return self.present[:, 1:].sum(1)

    def captions(self) -> list[str]:
        """The caption of every scene (see :func:`scene_caption`)."""
        return [scene_caption(*row) for row in
                torch.stack([self.labels, self.distractors, self.background], 1).tolist()]


def scene_caption(label: int, distractors: int, background: int) -> str:
    """"a large {colour} {shape} with {n} small object(s) on a {kind} background"."""
    plural = "s" if distractors > 1 else ""
    return (f"a large {CLASS_NAMES[label]} with {COUNT_WORDS[distractors - 1]} small "
            f"object{plural} on a {BACKGROUNDS[background]} background")


def parse_scene_caption(text: str) -> tuple[int, int, int]:
    """Inverse of :func:`scene_caption`: (class label, number of distractors, background).

    Raises:
        ValueError: ``text`` is not a scenes caption."""
    words = text.split()
    try:
        if (len(words) != 12 or words[:2] != ["a", "large"] or words[4] != "with"
                or words[6] != "small" or words[8:10] != ["on", "a"]
                or words[11] != "background"):
            raise ValueError
        count = COUNT_WORDS.index(words[5]) + 1
        if words[7] != ("objects" if count > 1 else "object"):
            raise ValueError
        return CLASS_NAMES.index(f"{words[2]} {words[3]}"), count, BACKGROUNDS.index(words[10])
    except ValueError:
        raise ValueError(f"not a scenes caption: {text!r}") from None


def _muted(n: int, g: torch.Generator) -> Tensor:
    """Two muted colours per scene [n, 2, 3]: a grey level plus a tint of chroma (``max - min``)
    below :data:`MAX_BACKGROUND_CHROMA`; the two grey levels are 0.15 to 0.3 apart."""
    grey0 = 0.15 + 0.45 * torch.rand(n, generator=g)
    delta = 0.15 + 0.15 * torch.rand(n, generator=g)
    grey1 = torch.where(grey0 + delta <= 0.65, grey0 + delta, grey0 - delta)
    tint = torch.rand(n, 2, 3, generator=g)
    tint = tint - tint.mean(-1, keepdim=True)
    spread = (tint.amax(-1, keepdim=True) - tint.amin(-1, keepdim=True)).clamp(min=1e-6)
    chroma = 0.9 * MAX_BACKGROUND_CHROMA * torch.rand(n, 2, 1, generator=g)
    # clamping each channel can only lower the chroma
    return (torch.stack([grey0, grey1], 1)[..., None] + tint / spread * chroma).clamp(0, 1)


def _place_distractors(main: Tensor, main_r: Tensor, radius: Tensor,
                       g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Centres [N, K, 2] and placed flags [N, K] of K distractors: for each, the first of
    :data:`_CANDIDATES` uniform candidates whose bounding circle keeps :data:`GAP` from the
    main object's and the distractors' placed before it (none fits: not placed). The first
    distractor's last candidate is the corner farthest from the main object, which always
    fits (the radii and margins are chosen so), so every scene has a distractor."""
    n, k = radius.shape
    centres, placed = torch.zeros(n, k, 2), torch.zeros(n, k, dtype=torch.bool)
    for j in range(k):
        lo = (BOUND * radius[:, j] + GAP / 2)[:, None, None]
        cand = lo + (1 - 2 * lo) * torch.rand(n, _CANDIDATES, 2, generator=g)
        if j == 0:
            cand[:, -1] = torch.where(main < 0.5, 1 - lo[:, 0], lo[:, 0])
        ok = (cand - main[:, None]).norm(dim=-1) >= (BOUND * (main_r[:, None] + radius[:, j:j + 1])
                                                     + GAP)
        for i in range(j):
            far = ((cand - centres[:, i:i + 1]).norm(dim=-1)
                   >= BOUND * (radius[:, i:i + 1] + radius[:, j:j + 1]) + GAP)
            ok &= far | ~placed[:, i:i + 1]
        first = ok.float().argmax(1)  # the first valid candidate (0 if none)
        centres[:, j] = cand[torch.arange(n), first]
        placed[:, j] = ok.any(1)
    return centres, placed


def sample_scenes(n: int, generator: torch.Generator) -> Scenes:
    """Draw the parameters of ``n`` scenes (classes, distractor counts and background kinds
    uniform; see the module docstring)."""
    g = generator
    k = 1 + MAX_DISTRACTORS
    jitter = lambda *s: 1 + 0.1 * (2 * torch.rand(*s, generator=g) - 1)  # noqa: E731
    label = torch.randint(len(CLASS_NAMES), (n,), generator=g)
    shape = torch.randint(len(SHAPES), (n, k), generator=g)
    shape[:, 0] = label // len(COLOURS)
    colour = torch.empty(n, k, dtype=torch.long)
    colour[:, 0] = label % len(COLOURS)
    offset = 1 + torch.randint(len(COLOURS) - 1, (n, k - 1), generator=g)  # any other colour
    colour[:, 1:] = (colour[:, :1] + offset) % len(COLOURS)
    radius = torch.cat([MAIN_RADIUS * jitter(n, 1), DISTRACTOR_RADIUS * jitter(n, k - 1)], 1)
    lo = BOUND * radius[:, 0] + GAP / 2
    main = lo[:, None] + (1 - 2 * lo[:, None]) * torch.rand(n, 2, generator=g)
    wanted = 1 + torch.randint(MAX_DISTRACTORS, (n,), generator=g)
    centres, placed = _place_distractors(main, radius[:, 0], radius[:, 1:], g)
    placed &= torch.arange(1, k)[None] <= wanted[:, None]
    return Scenes(
        shape=shape, colour=colour, centre=torch.cat([main[:, None], centres], 1),
        radius=radius, present=torch.cat([torch.ones(n, 1, dtype=torch.bool), placed], 1),
        background=torch.randint(len(BACKGROUNDS), (n,), generator=g),
        bg_colours=_muted(n, g), angle=torch.rand(n, generator=g) * math.pi,
        period=0.1 + 0.1 * torch.rand(n, generator=g), phase=torch.rand(n, 2, generator=g),
        noise=torch.rand(n, _NOISE_GRID, _NOISE_GRID, generator=g))


def _soft_step(s: Tensor, pixels: Tensor) -> Tensor:
    """Anti-aliased indicator of ``s > 0`` for a signed distance ``s`` (fractions of the
    side): a linear ramp one pixel wide (``pixels`` = resolution)."""
    return (s * pixels + 0.5).clamp(0, 1)


def _pattern(kind: int, sc: Scenes, resolution: int) -> Tensor:
    """The mix [N, R, R] in [0, 1] between the two background colours for pattern ``kind``
    (every scene drawn with that kind); edges are one-pixel linear ramps."""
    r = resolution
    if BACKGROUNDS[kind] == "mottled":  # smooth noise: a small random grid, upsampled
        return F.interpolate(sc.noise[:, None], size=(r, r), mode="bicubic",
                             align_corners=False)[:, 0].clamp(0, 1)
    coords = (torch.arange(r, dtype=torch.float32) + 0.5) / r
    y, x = coords[None, :, None], coords[None, None, :]
    cos, sin = sc.angle.cos()[:, None, None], sc.angle.sin()[:, None, None]
    per = sc.period[:, None, None]
    # (u, v): rotated coordinates in periods; frac - 1/2 is the offset from a cell's centre
    du = ((x * cos + y * sin) / per + sc.phase[:, 0, None, None]) % 1 - 0.5
    dv = ((y * cos - x * sin) / per + sc.phase[:, 1, None, None]) % 1 - 0.5
    if BACKGROUNDS[kind] == "striped":  # bands |du| < 1/4, signed distance in periods
        signed = 0.25 - du.abs()
    elif BACKGROUNDS[kind] == "checked":  # the sign alternates between cells
        su, sv = 0.25 - du.abs(), 0.25 - dv.abs()
        signed = torch.minimum(su.abs(), sv.abs()) * (su * sv).sign()
    else:  # dotted: discs of radius 0.3 periods at the cells' centres
        signed = 0.3 - torch.sqrt(du**2 + dv**2)
    return _soft_step(signed * per, r)


def _background(sc: Scenes, resolution: int) -> Tensor:
    """Backgrounds [N, 3, R, R] in [0, 1]: per pixel a mix of the two muted colours."""
    mix = torch.empty(len(sc), resolution, resolution)
    for kind in range(len(BACKGROUNDS)):
        sel = sc.background == kind
        if sel.any():
            mix[sel] = _pattern(kind, sc.select(sel), resolution)
    c0, c1 = sc.bg_colours[:, 0, :, None, None], sc.bg_colours[:, 1, :, None, None]
    return c0 + (c1 - c0) * mix[:, None]


def _coverage(sc: Scenes, obj: int, resolution: int) -> Tensor:
    """Anti-aliased coverage [N, R, R] of object ``obj``: rasterised at 4x in a box around it
    (the shapes rasteriser) and box-filtered, zero where the object is absent."""
    n, r, s = len(sc), resolution, SUPERSAMPLE
    rmax = (MAIN_RADIUS if obj == 0 else DISTRACTOR_RADIUS) * 1.1
    box = min(r, math.ceil(2 * BOUND * rmax * r) + 2)
    centre = sc.centre[:, obj] * r  # pixels
    corner = (centre - box / 2).floor().clamp(0, r - box).long()  # (x0, y0)
    local = (centre - corner) * s
    cover = torch.zeros(n, box, box)
    for k in range(len(SHAPES)):
        sel = (sc.shape[:, obj] == k) & sc.present[:, obj]
        if sel.any():
            mask = _mask(k, local[sel, 0], local[sel, 1], sc.radius[sel, obj] * r * s, box * s)
            cover[sel] = F.avg_pool2d(mask[:, None], s)[:, 0]
    full = torch.zeros(n, r, r)
    steps = torch.arange(box)
    rows = (corner[:, 1, None] + steps)[:, :, None]
    cols = (corner[:, 0, None] + steps)[:, None, :]
    full[torch.arange(n)[:, None, None], rows, cols] = cover
    return full


def render_scenes(scenes: Scenes, resolution: int,
                  return_masks: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Images [N, 3, R, R] in [-1, 1] of ``scenes``; with ``return_masks`` also the objects'
    coverages [N, 1 + MAX_DISTRACTORS, R, R] in [0, 1] (index 0: the main object)."""
    palette = torch.tensor(list(COLOURS.values()))
    images, masks = [], []
    for start in range(0, len(scenes), _CHUNK):
        sc = scenes.select(torch.arange(start, min(start + _CHUNK, len(scenes))))
        covers = torch.stack([_coverage(sc, obj, resolution)
                              for obj in range(1 + MAX_DISTRACTORS)], 1)  # [n, K, R, R]
        # the objects' 4x sub-pixels are disjoint, so coverages add (area compositing)
        paint = torch.einsum("nkhw,nkc->nchw", covers, palette[sc.colour])
        img = _background(sc, resolution) * (1 - covers.sum(1, keepdim=True)) + paint
        images.append(img * 2 - 1)
        if return_masks:
            masks.append(covers)
    out = torch.cat(images).contiguous()
    return (out, torch.cat(masks)) if return_masks else out


@dataclass
class SceneData(ImageData):
    """:class:`ImageData` of scenes with class labels (the main object, :data:`CLASS_NAMES`);
    ``scenes`` holds every image's parameters and ``texts`` its caption."""

    scenes: Scenes | None = None
    texts: list[str] = field(default_factory=list)


def check_resolution(resolution: int) -> None:
    """DataError unless ``resolution`` is a multiple of 8 of at least 16."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 16 \
            or resolution % 8:
        raise DataError(f"invalid resolution {resolution!r} for the scenes dataset: must be a "
                        f"multiple of 8 of at least 16 (64 is the intended size: "
                        f"--resolution 64)")


def load_scenes(resolution: int = 64, split: str = "train", test_fraction: float = 0.2,
                seed: int = 0, n: int = DEFAULT_SIZE,
                captions: bool = False) -> SceneData | CaptionedImageData:
    """The scenes of a split, deterministic in ``seed``.

    ``n`` scenes are drawn from ``seed``; the split is :func:`split_indices` of them
    (stratified by class, seeded by ``seed``), so train and test are disjoint and only the
    split's images are rendered.

    Args:
        resolution: side length, a multiple of 8 of at least 16 (64 is the intended size).
        split: "all", "train" or "test".
        test_fraction: share of the scenes in the test split.
        seed: seed of the scenes and of the split.
        n: number of scenes in "all" (the default gives 6000 train and 1500 test images).
        captions: return :class:`CaptionedImageData` whose labels index the sorted captions
            (text conditioning) instead of :class:`SceneData` with the 12 classes.
    """
    check_resolution(resolution)
    check_split(split, test_fraction)
    if isinstance(n, bool) or n < 2:
        raise DataError(f"scenes dataset needs n >= 2, got {n}")
    scenes = sample_scenes(n, torch.Generator().manual_seed(seed))
    scenes = scenes.select(split_indices(n, scenes.labels, split, test_fraction, seed))
    images = render_scenes(scenes, resolution)
    texts = scenes.captions()
    if captions:
        names = sorted(set(texts))
        index = {c: i for i, c in enumerate(names)}
        attrs = torch.stack([scenes.shape[:, 0], scenes.colour[:, 0], scenes.distractors,
                             scenes.background], 1)
        return CaptionedImageData(images, torch.tensor([index[t] for t in texts]), names,
                                  attributes=attrs)
    return SceneData(images, scenes.labels, list(CLASS_NAMES), scenes=scenes, texts=texts)


__all__ = ["BACKGROUNDS", "CLASS_NAMES", "SceneData", "Scenes", "load_scenes",
           "parse_scene_caption", "render_scenes", "sample_scenes", "scene_caption"]
