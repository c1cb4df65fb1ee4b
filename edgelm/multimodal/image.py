"""Image input for Gemma 3n: decode an image and turn it into the pixel array the vision
tower reads.

Gemma 3n's processor uses transformers' SigLIP image processor (`SiglipImageProcessor`, or
`SiglipImageProcessorPil` where torchvision is absent). This module equals the Pillow flavour:

1. `load_image(src)` decodes JPEG, PNG, WebP (and the rest Pillow reads) fully, so truncated
   files fail here, and applies the EXIF orientation (as transformers' `load_image` does).
2. `preprocess_image(img)`: convert to RGB (`do_convert_rgb`): an image with transparency
   (RGBA, LA, PA, or P/L/RGB with a transparent colour) is composited onto white, as the image
   processor does with an image object; the others go through Pillow's `convert("RGB")`
   (P, L, CMYK, I;16, ...). Then resize to `size` with Pillow (`resample`, bicubic by default),
   rescale by `rescale_factor` (1/255) in float64, cast to float32, normalize with
   `image_mean`/`image_std` in float32, and return channels first: float32 [3, H, W].

Settings come from the checkpoint's preprocessor_config.json (`ImageConfig.from_dict`);
absent fields take the SigLIP processor's defaults, except the size: 768 x 768, Gemma 3n's
resolution, where SigLIP's class default is 224.

Pillow is optional (the `vision` extra); without it these functions raise `BadInputError`
saying what to install. Unreadable, corrupt or truncated images raise `BadInputError`
naming the file.
"""

from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass

import numpy as np

from ..errors import BadInputError

VISION_EXTRA = "pip install 'edgelm[vision]'"

# Pillow's resampling filter numbers (transformers' PILImageResampling uses the same)
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise BadInputError(f"reading images needs Pillow: {VISION_EXTRA}") from None
    return Image, ImageOps


@dataclass(frozen=True)
class ImageConfig:
    """The image processor's settings (the fields of a preprocessor_config.json it reads)."""

    height: int = 768
    width: int = 768
    do_resize: bool = True
    resample: int = RESAMPLE["bicubic"]
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_convert_rgb: bool = True

    def __post_init__(self):
        if self.height < 1 or self.width < 1:
            raise BadInputError(f"image config: size must be positive, got {self.height} x {self.width}")
        if self.resample not in RESAMPLE.values():
            raise BadInputError(f"image config: unknown resample filter {self.resample!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0.0 in self.image_std:
            raise BadInputError("image config: image_mean and image_std need 3 values, std non-zero")

    @classmethod
    def from_dict(cls, d: dict | None) -> ImageConfig:
        """Read a preprocessor_config.json dict. `size` must be {"height", "width"} (the form
        Gemma 3n's has); center crops, padding and shortest-edge sizes are refused, since
        the SigLIP processor does not use them."""
        d = dict(d or {})
        kw = {}
        try:
            size = d.get("size")
            if size is not None:
                if not (isinstance(size, dict) and size.get("height") and size.get("width")):
                    raise BadInputError(f"image config: size {size!r} is not supported; "
                                        "it must be {'height': H, 'width': W}")
                kw["height"], kw["width"] = int(size["height"]), int(size["width"])
            for key in ("do_center_crop", "do_pad"):
                if d.get(key):
                    raise BadInputError(f"image config: {key} is not supported by this preprocessor")
            for f in dataclasses.fields(cls):
                v = d.get(f.name)
                if v is None or f.name in ("height", "width"):
                    continue
                if f.name == "resample":
                    v = RESAMPLE[v.lower()] if isinstance(v, str) else int(v)
                elif f.name in ("image_mean", "image_std"):
                    v = tuple(float(a) for a in (v if isinstance(v, (list, tuple)) else [v] * 3))
                elif f.name == "rescale_factor":
                    v = float(v)
                else:
                    v = bool(v)
                kw[f.name] = v
        except (TypeError, ValueError, KeyError) as e:
            raise BadInputError(f"image config: invalid value ({e})") from None
        return cls(**kw)


def load_image(src, *, name: str | None = None):
    """Decode an image (a path, or the file's bytes) to a fully loaded `PIL.Image.Image`, with
    its EXIF orientation applied. The mode is kept (alpha included); `preprocess_image` makes
    it RGB. `name` labels errors for bytes input."""
    Image, ImageOps = _pil()
    if isinstance(src, (bytes, bytearray, memoryview)):
        data, label = bytes(src), name or "<image bytes>"
    elif isinstance(src, (str, os.PathLike)):
        label = name or os.fspath(src)
        try:
            with open(src, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BadInputError(f"{label}: cannot read the image file: {e.strerror or e}") from None
    else:
        raise BadInputError(f"an image must be a file path or bytes, not {type(src).__name__}")
    if not data:
        raise BadInputError(f"{label}: the image file is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now: a truncated file fails here, not later
        img = ImageOps.exif_transpose(img)
    except Image.UnidentifiedImageError:
        raise BadInputError(f"{label}: not an image Pillow can read (an unknown format, or a cut-off header)") from None
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, zlib.error, ...
        msg = str(e).strip() or type(e).__name__
        raise BadInputError(f"{label}: corrupt or truncated image ({msg})") from None
    if img.width < 1 or img.height < 1:
        raise BadInputError(f"{label}: the image has no pixels ({img.width} x {img.height})")
    return img


def to_rgb(img, *, flatten_alpha: bool = True):
    """`img` as an RGB PIL image. Transparency is composited onto white (the image processor's
    `do_convert_rgb`). With `flatten_alpha=False` an alpha channel is dropped first, as
    transformers' `load_image` does to images it opens from a path or URL (a transparent
    palette or colour key survives that `convert("RGB")` and is still composited, as there)."""
    Image, _ = _pil()
    if not flatten_alpha:
        img = img.convert("RGB")
    transparent = "A" in img.getbands() or img.info.get("transparency") is not None
    if transparent:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def preprocess_image(img, size: int | tuple[int, int] | None = None, *,
                     config: dict | ImageConfig | None = None, flatten_alpha: bool = True) -> np.ndarray:
    """Pixels for Gemma 3n's vision tower: float32 [3, H, W].

    `img` is a PIL image, or a path or bytes (then `load_image` decodes it). `size` is an int
    (square) or (height, width) and overrides the config's; `config` is a
    preprocessor_config.json dict or an `ImageConfig` (None: Gemma 3n's 768 x 768 with
    SigLIP's defaults). `flatten_alpha`: see `to_rgb`.
    """
    cfg = config if isinstance(config, ImageConfig) else ImageConfig.from_dict(config)
    if size is not None:
        h, w = (size, size) if isinstance(size, (int, np.integer)) else size
        cfg = dataclasses.replace(cfg, height=int(h), width=int(w))
    Image, _ = _pil()
    if not isinstance(img, Image.Image):
        img = load_image(img)
    if cfg.do_convert_rgb or img.mode != "RGB":
        img = to_rgb(img, flatten_alpha=flatten_alpha)
    if cfg.do_resize:
        img = img.resize((cfg.width, cfg.height), resample=cfg.resample)
    x = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
    if cfg.do_rescale:
        x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    else:
        x = x.astype(np.float32)
    if cfg.do_normalize:
        x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
