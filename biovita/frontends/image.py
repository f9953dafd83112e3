"""Image front end: decode (with a decompression-bomb guard) -> RGB -> open_clip preprocess.

The preprocess is split where its pixels turn into floats: decoding ends with open_clip's
resize and crop (uint8 pixels), and `normalize` (its ToTensor + Normalize, bit for bit) runs
where the pixels are used, on the accelerator: decoded images cross the object store, the
network and the host-to-device copy at a quarter of the float32 bytes."""

from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass

import numpy as np

from biovita.errors import MediaError
from biovita.frontends.sniff import sniff

# Decompression-bomb guard: images whose header claims more pixels are refused before decoding.
MAX_IMAGE_PIXELS = 50_000_000
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageFrontEnd:
    """The eval preprocess of an open_clip model (BioCLIP 2: 224, bicubic, shortest-side)."""

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"


def read_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, reduce_to: int = 0):
    """Encoded bytes -> RGB PIL image, upright (EXIF orientation applied). Raises MediaError
    (never returns a placeholder).

    `reduce_to`: a JPEG at least twice that size on its shorter side is decoded at a reduced
    scale (1/2, 1/4 or 1/8, in the DCT), keeping the shorter side >= `reduce_to`: a 12 MP
    photo for a 224 px model decodes ~3x faster. 0 decodes at full size."""
    from PIL import Image

    kind = sniff(data)
    if data is None:
        raise MediaError("missing_file")
    if kind == "empty":
        raise MediaError("empty_file")
    if kind in ("html", "text"):
        raise MediaError("html_page" if kind == "html" else "not_image", data[:60].decode("utf-8", "replace"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:  # checked from the header, before any pixel is decoded
                raise MediaError("too_large", f"{w}x{h} > {max_pixels} pixels")
            if w == 0 or h == 0:
                raise MediaError("undecodable", "zero-sized image")
            if reduce_to and img.format == "JPEG" and min(w, h) >= 2 * reduce_to:
                m = min(w, h)
                img.draft("RGB", (-(-reduce_to * w // m), -(-reduce_to * h // m)))
            img.load()
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaError("too_large", str(e)[:200]) from None
    except Exception as e:
        raise MediaError("undecodable", str(e)[:200]) from None
    return to_rgb(upright(img))


def upright(img):
    """The photo as the camera's EXIF orientation tag says it was held."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a damaged EXIF block: the pixels are still good
        return img


def to_rgb(img):
    """8-bit RGB from any mode: 16- and 32-bit greyscale scaled (not clipped) to 8 bits,
    transparency composited over white, CMYK and palettes converted."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("PA", "LA", "RGBA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


@functools.lru_cache(maxsize=4)
def preprocess(fe: ImageFrontEnd):
    """open_clip's own eval transform (the reference for BioCLIP 2)."""
    import open_clip

    return open_clip.image_transform(
        fe.image_size,
        is_train=False,
        mean=fe.mean,
        std=fe.std,
        resize_mode=fe.resize_mode,
        interpolation=fe.interpolation,
    )


@functools.lru_cache(maxsize=4)
def geometry(fe: ImageFrontEnd):
    """open_clip's eval transform without its last two steps (to float, normalise)."""
    from torchvision.transforms import Compose

    steps = preprocess(fe).transforms
    tail = [type(t).__name__ for t in steps[-2:]]
    if len(tail) != 2 or "ToTensor" not in tail[0] or tail[1] != "Normalize":
        raise RuntimeError(f"unexpected open_clip preprocess {steps}: expected it to end with "
                           "ToTensor, Normalize")
    return Compose(steps[:-2])


def load_image(data: bytes, fe: ImageFrontEnd, max_pixels: int = MAX_IMAGE_PIXELS,
               reduced: bool = True) -> np.ndarray:
    """Encoded bytes -> 3 x S x S uint8 pixels, resized and cropped. Raises MediaError.
    `reduced`: large JPEGs decode at a reduced scale first (see `read_image`)."""
    img = geometry(fe)(read_image(data, max_pixels, fe.image_size if reduced else 0))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def normalize(pixels, fe: ImageFrontEnd):
    """uint8 (..., 3, S, S) pixels -> float32, as open_clip's ToTensor + Normalize compute it."""
    import torch

    x = pixels.float().div(255)
    mean = torch.tensor(fe.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(fe.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x.sub(mean).div(std)
