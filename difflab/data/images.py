"""Image file I/O: PNG grids and single images, and Pillow mode handling shared by the loaders.

Tensors are ``[C, H, W]`` / ``[N, C, H, W]`` with values in ``[-1, 1]``; the pixel scaling is
:func:`difflab.data.base.to_uint8` / :func:`difflab.data.base.from_uint8`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import Tensor

from ..io import atomic_write
from .base import DataError, from_uint8, to_uint8

_MODE_FOR_CHANNELS = {1: "L", 3: "RGB", 4: "RGBA"}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
WHITE = (255, 255, 255)


def _check_channels(channels: int, allowed: tuple[int, ...] = (1, 3)) -> None:
    if isinstance(channels, bool) or channels not in allowed:
        raise DataError(f"invalid channels={channels!r}: expected one of {list(allowed)}")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit "L" (Pillow's own convert clips)."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        arr = arr.astype(np.float64) / 257.0
    elif img.mode == "I":
        arr = arr.astype(np.float64)
        # 16-bit files often open as mode "I"; treat them as 16-bit when values exceed 8 bits.
        arr = np.clip(arr, 0, 65535) / 257.0 if arr.size and arr.max() > 255 else arr
    else:  # "F": assume [0, 1] when it fits, else 0..255
        arr = arr.astype(np.float64)
        finite_max = np.nanmax(arr) if arr.size else 0.0
        arr = arr * 255.0 if finite_max <= 1.0 else arr
    arr = np.nan_to_num(arr, nan=0.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def pil_to_mode(
    img: Image.Image, channels: int, background: tuple[int, int, int] = WHITE
) -> Image.Image:
    """Convert a Pillow image of any mode to "L" (``channels=1``) or "RGB" (``channels=3``).

    EXIF orientation is applied; 16-bit and float greyscale is rescaled to 8 bits; images with
    transparency (RGBA, LA, palette or greyscale with a transparent colour) are composited over
    ``background`` (white by default).
    """
    _check_channels(channels)
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_depth_to_l(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        img = Image.alpha_composite(base, rgba).convert("RGB")
    target = _MODE_FOR_CHANNELS[channels]
    return img if img.mode == target else img.convert(target)


def pil_to_uint8(img: Image.Image) -> Tensor:
    """An "L", "RGB" or "RGBA" Pillow image -> uint8 tensor ``[C, H, W]``."""
    arr = np.array(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _uint8_to_pil(image: Tensor) -> Image.Image:
    """uint8 ``[C, H, W]`` (C in 1, 3, 4) -> Pillow image."""
    arr = image.permute(1, 2, 0).contiguous().numpy()
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], "L")
    return Image.fromarray(arr, _MODE_FOR_CHANNELS[arr.shape[2]])


def _atomic_save_png(img: Image.Image, path: Path) -> Path:
    """Write ``img`` as PNG to ``path`` via a temporary file in the same directory."""
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def _as_batch(images: Tensor, what: str) -> Tensor:
    if not isinstance(images, Tensor):
        raise DataError(f"{what}: expected a tensor, got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
        raise DataError(
            f"{what}: expected images of shape [N, C, H, W] with C in (1, 3, 4), "
            f"got {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise DataError(f"{what}: no images to save (N = 0)")
    return images


def _grid_uint8(images: Tensor, what: str, nrow: int | None, scale: int, padding: int,
                pad_value: float) -> tuple[Tensor, int, int]:
    """The uint8 grid ``[C, H', W']`` of :func:`save_grid` and its cell size (h, w), scaled."""
    images = _as_batch(images, what)
    for name, value, low in (("scale", scale, 1), ("padding", padding, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DataError(f"{what}: invalid {name}={value!r}, must be an int >= {low}")
    n, c, h, w = images.shape
    if nrow is None:
        nrow = math.ceil(math.sqrt(n))
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise DataError(f"{what}: invalid nrow={nrow!r}, must be an int >= 1")
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    u8 = to_uint8(images)
    if scale > 1:
        u8 = u8.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        h, w = h * scale, w * scale
    fill = int(to_uint8(torch.tensor(float(pad_value))).item())
    grid = torch.full(
        (c, nrows * h + (nrows + 1) * padding, ncol * w + (ncol + 1) * padding),
        fill,
        dtype=torch.uint8,
    )
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = u8[i]
    return grid, h, w


def save_grid(
    images: Tensor,
    path: str | os.PathLike[str],
    nrow: int | None = None,
    scale: int = 1,
    padding: int = 1,
    pad_value: float = 1.0,
) -> Path:
    """Save images as one PNG grid, atomically, creating parent directories.

    Args:
        images: ``[N, C, H, W]`` (or a single ``[C, H, W]``) with values in ``[-1, 1]``,
            C in (1, 3, 4); any device.
        path: output file; written as PNG whatever its suffix.
        nrow: images per row (default ``ceil(sqrt(N))``, at most N).
        scale: integer nearest-neighbour upscaling of each image (e.g. 4 for 8x8 digits).
        padding: pixels of ``pad_value`` between images and around the border (not scaled).
        pad_value: colour of the padding in ``[-1, 1]`` (default white).

    The output is ``ncol * W * scale + (ncol + 1) * padding`` pixels wide and
    ``nrows * H * scale + (nrows + 1) * padding`` high, ``nrows = ceil(N / ncol)``.

    Returns:
        The path written.
    """
    grid, _, _ = _grid_uint8(images, f"save_grid({path})", nrow, scale, padding, pad_value)
    return _atomic_save_png(_uint8_to_pil(grid), Path(path))


#: white space (pixels) around label text
_GAP = 4
#: margin and text colours per Pillow mode (opaque for RGBA)
_PAPER_INK = {"L": (255, 0), "RGB": ((255, 255, 255), (0, 0, 0)),
              "RGBA": ((255, 255, 255, 255), (0, 0, 0, 255))}


def _fit(text: str, font: ImageFont.ImageFont, width: float) -> str:
    """``text`` cut (with "...") to at most ``width`` pixels in ``font``."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..." if text else ""


def labelled_grid_image(
    images: Tensor,
    nrow: int | None = None,
    scale: int = 1,
    *,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    caption: str | None = None,
    padding: int = 1,
    pad_value: float = 1.0,
) -> tuple[Image.Image, tuple[int, int]]:
    """The :func:`save_grid` grid with margins for text, and where the grid sits in it.

    ``row_labels`` (one per grid row, cut to 200 pixels) go in a left margin, vertically
    centred on their row; ``col_labels`` (one per column, cut to the cell width) in a top
    margin; ``caption`` in a bottom line (the image widens for a long caption). Text is black on
    white, in Pillow's built-in default font. The raw grid is pasted unchanged, so its cells
    are pixel-identical to :func:`save_grid`'s. Returns (image, (left, top) of the raw grid).
    """
    grid_u8, h, w = _grid_uint8(images, "labelled grid", nrow, scale, padding, pad_value)
    grid = _uint8_to_pil(grid_u8)
    font = ImageFont.load_default()
    line = int(font.getbbox("Ag|")[3]) + 2 * _GAP
    rows = [_fit(t, font, 200) for t in row_labels or []]
    left = int(max((font.getlength(t) for t in rows), default=-2 * _GAP)) + 2 * _GAP
    top = line if col_labels else 0
    cap_w = int(font.getlength(caption)) + 2 * _GAP if caption else 0
    width = max(left + grid.width, cap_w)
    height = top + grid.height + (line if caption else 0)
    white, black = _PAPER_INK[grid.mode]
    canvas = Image.new(grid.mode, (width, height), white)
    canvas.paste(grid, (left, top))
    draw = ImageDraw.Draw(canvas)
    for r, text in enumerate(rows):  # centred on row r
        y = top + padding + r * (h + padding) + h // 2
        draw.text((_GAP, y), text, fill=black, font=font, anchor="lm")
    for c, text in enumerate(col_labels or []):
        x = left + padding + c * (w + padding) + w // 2
        draw.text((x, line // 2), _fit(text, font, w + padding), fill=black, font=font,
                  anchor="mm")
    if caption:
        draw.text((_GAP, top + grid.height + line // 2), caption, fill=black, font=font,
                  anchor="lm")
    return canvas, (left, top)


def save_labelled_grid(
    images: Tensor,
    path: str | os.PathLike[str],
    nrow: int | None = None,
    scale: int = 1,
    *,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    caption: str | None = None,
) -> Path:
    """Save :func:`labelled_grid_image` as PNG, atomically (for a grid without text, with exact
    pixels only, use :func:`save_grid`)."""
    img, _ = labelled_grid_image(images, nrow, scale, row_labels=row_labels,
                                 col_labels=col_labels, caption=caption)
    return _atomic_save_png(img, Path(path))


def save_images(
    images: Tensor, directory: str | os.PathLike[str], prefix: str = "img"
) -> list[Path]:
    """Save each image as its own PNG ``directory/{prefix}_{index:05d}.png`` (atomically).

    Args:
        images: ``[N, C, H, W]`` (or ``[C, H, W]``) in ``[-1, 1]``, C in (1, 3, 4).
        directory: output folder, created if needed.
        prefix: file name prefix.

    Returns:
        The paths written, in order.
    """
    images = _as_batch(images, f"save_images({directory})")
    directory = Path(directory)
    digits = max(5, len(str(images.shape[0] - 1)))
    u8 = to_uint8(images)
    return [
        _atomic_save_png(_uint8_to_pil(img), directory / f"{prefix}_{i:0{digits}d}.png")
        for i, img in enumerate(u8)
    ]


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side is ``resolution`` (bicubic, antialiased), then take the
    centred ``resolution x resolution`` crop."""
    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    if (nw, nh) != (resolution, resolution):
        img = img.crop((left, top, left + resolution, top + resolution))
    return img


def fit_image(img: Image.Image, resolution: int, channels: int,
              background: tuple[int, int, int] = WHITE) -> Tensor:
    """uint8 ``[channels, resolution, resolution]`` of a Pillow image, prepared the way every
    loader prepares one: :func:`pil_to_mode`, then :func:`resize_center_crop`."""
    return pil_to_uint8(resize_center_crop(pil_to_mode(img, channels, background), resolution))


def load_png(path: str | os.PathLike[str], channels: int = 3,
             resolution: int | None = None) -> Tensor:
    """Load one image file (PNG or any format Pillow reads) as ``[channels, H, W]`` in
    ``[-1, 1]``; ``channels`` is 1 (grey) or 3 (RGB), converted as in :func:`pil_to_mode`.
    With ``resolution``, resized and center-cropped to it as the folder loader does.

    Raises:
        DataError: the file is missing or cannot be decoded (the message names the path).
    """
    _check_channels(channels)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file does not exist: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            converted = pil_to_mode(img, channels)
            if resolution is not None:
                converted = resize_center_crop(converted, resolution)
    except Exception as exc:  # Pillow raises many types for bad files
        raise DataError(f"cannot read image file {path}: {exc}") from exc
    return from_uint8(pil_to_uint8(converted))


def save_scatter(points: Tensor, path: str | os.PathLike[str], size: int = 384,
                 extent: float | None = None) -> Path:
    """Write 2-D points ``[N, 2]`` as a PNG scatter plot (black dots on white), atomically.

    The square view spans ``[-extent, extent]`` on both axes (default: the 99.5th percentile of
    ``|points|`` plus a margin), with y pointing up.
    """
    pts = torch.as_tensor(points).detach().float().cpu()
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise DataError(f"save_scatter needs points of shape [N, 2], got {tuple(pts.shape)}")
    if extent is None:
        extent = float(pts.abs().flatten().quantile(0.995)) * 1.1 if len(pts) else 1.0
    extent = max(extent, 1e-6)
    pix = ((pts / extent + 1) / 2 * (size - 1)).round()
    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    draw.line([(size // 2, 0), (size // 2, size)], fill=220)
    draw.line([(0, size // 2), (size, size // 2)], fill=220)
    for x, y in pix.tolist():
        if 0 <= x < size and 0 <= y < size:
            draw.point((x, size - 1 - y), fill=0)
    return _atomic_save_png(img, Path(path))
