"""Uploaded images and drawn masks -> tensors; images -> PNG bytes.

An upload is opened from memory, and its width and height are read from the header and
checked against :attr:`ServeLimits.max_image_side` before any pixel is decoded, so a small
file that declares a huge image costs nothing. Anything Pillow cannot decode is a ValueError
with a one-line message (the web page shows it; the client gets HTTP 400).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..data import from_uint8, to_uint8
from ..data.images import pil_to_mode, pil_to_uint8, resize_center_crop
from .limits import ServeLimits


def open_upload(data: bytes, what: str, limits: ServeLimits) -> Image.Image:
    """The decoded image in ``data`` (``what`` names it in errors: "image", "mask")."""
    if not data:
        raise ValueError(f"the {what} upload is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"the {what} upload declares an image too large to decode; at most "
                         f"{limits.max_image_side}x{limits.max_image_side} pixels are accepted"
                         ) from None
    except UnidentifiedImageError:
        raise ValueError(f"the {what} upload is not an image file that can be read (PNG, "
                         "JPEG, ...)") from None
    except Exception as e:  # Pillow raises many types for files it cannot read
        raise ValueError(f"the {what} upload cannot be read as an image ({type(e).__name__}: "
                         f"{e})") from None
    w, h = img.size
    side = limits.max_image_side
    if w > side or h > side:
        raise ValueError(f"the {what} upload is {w}x{h} pixels; at most {side}x{side} are "
                         "accepted")
    try:
        img.load()
    except Exception as e:
        raise ValueError(f"the {what} upload is corrupt or cut short ({type(e).__name__}: "
                         f"{e})") from None
    return img


def read_image(data: bytes, channels: int, resolution: int, limits: ServeLimits) -> Tensor:
    """An uploaded image as the model sees it: ``channels`` (1 grey, 3 RGB), resized and
    centre-cropped to ``resolution`` as training data is, in [-1, 1]: [C, R, R]."""
    img = pil_to_mode(open_upload(data, "image", limits), channels)
    return from_uint8(pil_to_uint8(resize_center_crop(img, resolution)))


def read_mask(data: bytes, height: int, width: int, limits: ServeLimits) -> Tensor:
    """A mask drawn over the (square, already cropped) image: its alpha channel if it has one
    (a canvas's strokes), else its grey level; a pixel above half is painted. Brought to
    ``height`` x ``width`` by max-pooling, so a model pixel is regenerated when any painted
    pixel covers it. Returns 0/1 floats [1, 1, H, W]; a ValueError for an empty mask."""
    img = open_upload(data, "mask", limits)
    band = img.getchannel("A") if "A" in img.getbands() else img.convert("L")
    painted = torch.from_numpy(np.asarray(band) > 127).float()[None, None]
    mask = F.adaptive_max_pool2d(painted, (height, width))
    if not bool(mask.any()):
        raise ValueError("the mask is empty: paint over the part of the image to regenerate")
    return mask


def png_bytes(image: Tensor) -> bytes:
    """One image [C, H, W] in [-1, 1] as PNG bytes (8-bit grey or RGB)."""
    pixels = to_uint8(image.detach().float().cpu()).permute(1, 2, 0).numpy()
    img = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_images(images: Tensor) -> list[bytes]:
    """A batch [N, C, H, W] -> N PNGs."""
    return [png_bytes(x) for x in torch.as_tensor(images)]
