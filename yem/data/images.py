"""Decoding training images robustly: any file Pillow reads becomes upright 8-bit RGB, then the crop the VAE sees.

How any Pillow mode becomes 8-bit RGB (alpha on white, 16-bit scaled), how huge photos are decoded reduced, what
is too large to decode safely, and where a crop falls (fixed per sample id). Problems raise DataError naming the file.
"""

import hashlib
import struct
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from yem.data.buckets import Bucket
from yem.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
HEIF_SUFFIXES = {".heic", ".heif"}  # iPhone photos; read through pillow-heif, the maintained Pillow plugin
try:
    from pillow_heif import register_heif_opener

    register_heif_opener()  # libheif applies the file's rotation and resets EXIF orientation to 1: no double turn
    IMAGE_SUFFIXES |= HEIF_SUFFIXES
except ImportError:  # a dependency on macOS, the `heic` extra elsewhere: without it HEIC files are skipped
    pass
# Pillow's default bomb limit (~89 MP) refuses real 100-200 MP camera photos; above this bound an image is a
# decompression bomb or far larger than any training resolution needs. Decoded RGBA at the bound: 1 GB.
MAX_PIXELS = 250_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Huge images are decoded reduced, but never below this many times the training resolution, so the final
# LANCZOS resize (bucket_crop) still has detail to work with.
REDUCE_MARGIN = 2
# What Pillow raises on a malformed file, besides UnidentifiedImageError.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError)
ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
               7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}  # EXIF tag 0x0112 -> upright
SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}
QUARTER_TURNS = {Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
                 Image.Transpose.ROTATE_90}  # the orientations that swap width and height


def open_image(path: Path, min_side: int | None = None) -> Image.Image:
    """Decode an image upright (EXIF orientation applied) as 8-bit RGB.

    With `min_side`, a huge image is decoded reduced (JPEG through its DCT scaling, others by pixel blocks)
    to a short side of at least REDUCE_MARGIN × min_side, so memory follows the training resolution rather
    than the camera's: a 48 MP JPEG never exists in memory at full size.
    """
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (got 0 bytes). Re-export it, or remove it.")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _load(image, min_side)
                turn = _orientation(image)
                image = to_rgb(_reduced(image, min_side))
    except FileNotFoundError:
        raise DataError(f"{path}: file disappeared. Rerun the pipeline (dvc repro).") from None
    except PermissionError:
        raise DataError(f"{path}: cannot read it (permission denied). Fix its permissions, or remove it.") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image Pillow can read (corrupt, or another format with an image suffix). "
                        f"Re-export it, or remove it.") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{path}: too large to decode safely (got over {MAX_PIXELS:,} pixels: a decompression bomb?). "
                        f"Downscale it, or remove it.") from None
    except DECODE_ERRORS as e:
        raise DataError(f"{path}: cannot decode the image (got {' '.join(str(e).split()) or type(e).__name__}). "
                        f"The file is truncated or corrupt: re-export it, or remove it.") from None
    return image.transpose(turn) if turn is not None else image


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) of the photo as it is seen (EXIF rotation applied), from its header alone."""
    try:
        with Image.open(path) as image:
            turned = _orientation(image) in QUARTER_TURNS
            width, height = image.size
    except (UnidentifiedImageError, *DECODE_ERRORS) as e:
        raise DataError(f"{path}: not an image Pillow can read (got {type(e).__name__}). Re-export it, or remove "
                        f"it.") from None
    return (height, width) if turned else (width, height)


def _load(image: Image.Image, min_side: int | None) -> None:
    """Decode the pixels; a JPEG far larger than `min_side` needs is decoded by libjpeg at 1/2, 1/4 or 1/8 scale."""
    if min_side:
        image.draft(None, (REDUCE_MARGIN * min_side, REDUCE_MARGIN * min_side))  # both sides stay ≥ the request
    image.load()


def _orientation(image: Image.Image) -> Image.Transpose | None:
    """The transposition that makes the photo upright; None when there is nothing to do or the EXIF is garbled."""
    try:
        return ORIENTATION.get(image.getexif().get(ExifTags.Base.Orientation))
    except DECODE_ERRORS:
        return None  # a broken EXIF block should not cost a good photo


def _reduced(image: Image.Image, min_side: int | None) -> Image.Image:
    """`image` shrunk by whole pixel blocks while its short side stays ≥ REDUCE_MARGIN × min_side, before any
    colour conversion copies it."""
    if not min_side:
        return image
    if image.mode in ("P", "1") or image.mode in SIXTEEN_BIT:
        image = to_rgb(image)  # modes Image.reduce cannot handle; the copy is at most 4 bytes per pixel
    factor = min(image.size) // (REDUCE_MARGIN * min_side)
    return image.reduce(factor) if factor >= 2 else image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: alpha is composited on white, 16-bit is scaled, not clipped."""
    if image.mode in SIXTEEN_BIT or image.mode in ("I", "F"):
        image = _gray_to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA")  # applies a tRNS transparency table, if there is one
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV and the above


def _gray_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale -> L, scaled by the range of the format (Pillow's convert would clip at 255)."""
    pixels = np.asarray(image)
    if image.mode in SIXTEEN_BIT:
        peak = 65535.0
    else:  # "I" and "F" do not record their range: 16-bit data in a 32-bit container, or 8-bit values
        peak = 65535.0 if pixels.max(initial=0) > 255 else 255.0
    scaled = np.clip(pixels.astype(np.float32) * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def check_size(image: Image.Image, bucket: Bucket, small_images: Literal["upscale", "refuse"],
               path: Path) -> str | None:
    """None when the image covers its bucket; a note when it will be upscaled; DataError when that is refused."""
    if _cover_scale(image, bucket) <= 1:
        return None
    if small_images == "refuse":
        raise DataError(f"{path}: smaller than its {bucket.label} bucket (got {image.width}×{image.height}). Use a "
                        f"larger image, lower data.resolution, or set data.small_images: upscale.")
    return (f"{path}: smaller than its {bucket.label} bucket (got {image.width}×{image.height}); upscaled, so it "
            f"trains soft. Use a larger image, or set data.small_images: refuse to stop on such images.")


def _cover_scale(image: Image.Image, bucket: Bucket) -> float:
    """The scale at which the image just covers the bucket (one side equal, the other at least as long)."""
    return max(bucket.width / image.width, bucket.height / image.height)


def bucket_crop(image: Image.Image, bucket: Bucket, center: bool, rng: np.random.Generator) -> Image.Image:
    """Resize the image to just cover `bucket`, then crop the bucket out of it (centred, or where `rng` says): only
    the sliver between the image's aspect ratio and the bucket's is lost. A square bucket crops as it always did."""
    scale = _cover_scale(image, bucket)
    size = (max(bucket.width, round(image.width * scale)), max(bucket.height, round(image.height * scale)))
    # reducing_gap: shrink huge photos in integer steps first, so memory and time stay small
    image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if center:
        left, top = (image.width - bucket.width) // 2, (image.height - bucket.height) // 2
    else:
        left = int(rng.integers(0, image.width - bucket.width + 1))
        top = int(rng.integers(0, image.height - bucket.height + 1))
    return image.crop((left, top, left + bucket.width, top + bucket.height))


def crop_rng(sample_id: str) -> np.random.Generator:
    """A crop position fixed per sample: independent of processing order, stable across reruns."""
    digest = hashlib.sha256(sample_id.encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))
