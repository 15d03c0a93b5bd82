"""Training images and their captions: discovery, pairing by identity, and robust decoding to square RGB.

A sample's id is `<kind>/<stem>` (kind: instance or prior). Every cache downstream is keyed by that id, never
by position, so shuffling can never pair a caption with another image's latents (diffusers #14430).

This module owns every rule about input files: which files are images, which caption belongs to which image,
how any Pillow mode becomes 8-bit RGB, and what is refused. A problem the user must fix raises DataError; when
a folder has several, all of them are reported at once, one line each.
"""

import codecs
import hashlib
import os
import struct
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from yem.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
CAPTION_SUFFIX = ".txt"
# Photo formats people have that Pillow cannot read: say how to convert them instead of just "not an image".
CONVERT_HINTS = {".heic": "HEIC", ".heif": "HEIF", ".dng": "camera raw", ".cr2": "camera raw", ".nef": "camera raw",
                 ".arw": "camera raw"}
Kind = Literal["instance", "prior"]
# Pillow's default bomb limit (~89 MP) refuses real 100-200 MP camera photos; above this bound an image is a
# decompression bomb or far larger than any training resolution needs. Decoded RGBA at the bound: 1 GB.
MAX_PIXELS = 250_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Huge images are decoded reduced, but never below this many times the training resolution, so the final
# LANCZOS resize (square_crop) still has detail to work with.
REDUCE_MARGIN = 2
# What Pillow raises on a malformed file, besides UnidentifiedImageError.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError)
ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
               7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}  # EXIF tag 0x0112 -> upright
SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}


@dataclass(frozen=True, slots=True)
class Sample:
    id: str  # "<kind>/<stem>" (stem in Unicode NFC): the key of its latents and its caption everywhere
    kind: Kind
    path: Path
    caption: str | None  # text of `<stem>.txt` beside the image, or None
    caption_file: Path | None = None  # where `caption` came from


@dataclass(frozen=True, slots=True)
class Discovery:
    samples: list[Sample]
    notes: list[str]  # files skipped or fixed up, for the user to read


def several(problems: list[str]) -> DataError:
    """One DataError for every problem found: a single line each, so one run shows the user all of them."""
    if len(problems) == 1:
        return DataError(problems[0])
    lines = "\n".join(f"  {problem}" for problem in problems)
    return DataError(f"{len(problems)} problems with the training data; fix each, then rerun:\n{lines}")


def discover(folder: Path, kind: Kind, params_key: str) -> Discovery:
    """List the images in `folder` with their captions; raise DataError when the folder or a file cannot be used."""
    _check_folder(folder, params_key)
    entries = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]  # .DS_Store, our temporaries
    captions = {_name_key(p.stem): p for p in entries if p.suffix.lower() == CAPTION_SUFFIX}
    notes, problems, samples, seen = [], [], [], {}
    for path in entries:
        if path.suffix.lower() == CAPTION_SUFFIX:
            continue  # read with its image
        try:
            skipped = _skip_note(path)
            if skipped is None:
                sample, skipped = _sample(path, kind, captions.get(_name_key(path.stem)), seen)
                samples.append(sample)
        except DataError as e:
            problems.append(str(e))
            continue
        notes += [skipped] if skipped else []
    notes += [f"{_shown(p)}: caption with no image named {_shown(Path(p.stem))}.*; ignored. Rename it after its "
              f"image, or remove it." for key, p in captions.items() if key not in seen]
    if problems:
        raise several(problems)
    if not samples:
        listed = ", ".join(_shown(Path(p.name)) for p in entries[:3]) + (", …" if len(entries) > 3 else "")
        raise DataError(f"{params_key}: no images in {folder} (got {len(entries)} other files{': ' * bool(entries)}"
                        f"{listed}). Add {', '.join(sorted(IMAGE_SUFFIXES))} files, or fix the path.")
    return Discovery(samples=samples, notes=notes)


def _check_folder(folder: Path, params_key: str) -> None:
    if not folder.exists():
        raise DataError(f"{params_key}: folder {folder} does not exist. Create it and add images, or fix the path.")
    if not folder.is_dir():
        raise DataError(f"{params_key}: {folder} is a file, not a folder. Point it at the folder of images.")


def _name_key(stem: str) -> str:
    """Names APFS and NTFS treat as one (case, Unicode normalization) share a key: they would collide there."""
    return unicodedata.normalize("NFC", stem).casefold()


def _shown(path: Path) -> str:
    """A path printable anywhere: bytes that are not UTF-8 (possible in Linux names) as \\x escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _skip_note(path: Path) -> str | None:
    """Why `path` is not a training image (a note), None when it is one; DataError for a broken image link."""
    suffix = path.suffix.lower()
    if path.is_symlink() and not path.exists():
        where = f"{_shown(path)}: broken link (to {_shown(Path(os.readlink(path)))})"
        if suffix in IMAGE_SUFFIXES:
            raise DataError(f"{where}. Fix the link or remove it.")
        return f"{where}; skipped."
    if path.is_dir():
        return f"{_shown(path)}: skipped, a folder (images in subfolders are not used). Move them up to use them."
    if suffix in CONVERT_HINTS:
        return f"{_shown(path)}: skipped, {CONVERT_HINTS[suffix]} cannot be read. Export it as JPEG or PNG to use it."
    if suffix not in IMAGE_SUFFIXES:
        return f"{_shown(path)}: skipped, not an image ({', '.join(sorted(IMAGE_SUFFIXES))})."
    if not path.is_file():
        return f"{_shown(path)}: skipped, not a regular file."
    if _shown(path) != str(path):
        raise DataError(f"{_shown(path)}: file name is not valid UTF-8. Rename it.")
    return None


def _sample(path: Path, kind: Kind, caption_file: Path | None, seen: dict[str, Path]) -> tuple[Sample, str | None]:
    """The sample for image `path` (registered in `seen`) and a note about its caption, if any."""
    key = _name_key(path.stem)
    if key in seen:
        raise DataError(f"{path}: same name as {seen[key]} (got {path.stem!r} twice, ignoring letter case and how "
                        f"accents are encoded), so their captions and caches would collide. Rename one of them.")
    seen[key] = path
    caption, note = read_caption(caption_file, "prompts.instance" if kind == "instance" else "prompts.prior")
    sample_id = f"{kind}/{unicodedata.normalize('NFC', path.stem)}"
    return Sample(id=sample_id, kind=kind, path=path, caption=caption,
                  caption_file=caption_file if caption is not None else None), note


def read_caption(path: Path | None, fallback_key: str = "prompts.instance") -> tuple[str | None, str | None]:
    """The caption text (whitespace collapsed) and a note for the user, if any."""
    if path is None or not path.exists():
        return None, None
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the caption ({e.strerror}). Fix its permissions, or remove it.") from None
    text = " ".join(_decode_caption(raw, path).split())
    if not text:
        return None, f"{path}: empty caption; its image uses {fallback_key}."
    return text, None


def _decode_caption(raw: bytes, path: Path) -> str:
    """UTF-8 (a BOM is tolerated); UTF-16 only with its BOM, as Windows Notepad writes it."""
    encoding = "utf-16" if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: caption is not UTF-8 text (got byte {raw[e.start:e.start + 1]!r} at offset "
                        f"{e.start}). Save it as UTF-8.") from None
    if "\x00" in text:  # UTF-16 without a BOM decodes as UTF-8 with a NUL between letters
        raise DataError(f"{path}: caption is not UTF-8 text (got NUL characters: UTF-16?). Save it as UTF-8.")
    return text


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise DataError(f"{path}: cannot read it (got {e.strerror}). Put it back or fix its permissions, "
                        f"then rerun: dvc repro.") from None
    return digest.hexdigest()


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


def check_size(image: Image.Image, resolution: int, small_images: Literal["upscale", "refuse"],
               path: Path) -> str | None:
    """None when the image is large enough; a note when it will be upscaled; DataError when that is refused."""
    if min(image.size) >= resolution:
        return None
    if small_images == "refuse":
        raise DataError(f"{path}: smaller than data.resolution {resolution} (got {image.width}×{image.height}). "
                        f"Use a larger image, lower data.resolution, or set data.small_images: upscale.")
    return (f"{path}: smaller than data.resolution {resolution} (got {image.width}×{image.height}); upscaled, so it "
            f"trains soft. Use a larger image, or set data.small_images: refuse to stop on such images.")


def square_crop(image: Image.Image, resolution: int, center: bool, rng: np.random.Generator) -> Image.Image:
    """Resize the short side to `resolution`, then crop a `resolution`² square (centred, or where `rng` says)."""
    short = min(image.size)
    scale = resolution / short
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    # reducing_gap: shrink huge photos in integer steps first, so memory and time stay small
    image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if center:
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    else:
        left = int(rng.integers(0, image.width - resolution + 1))
        top = int(rng.integers(0, image.height - resolution + 1))
    return image.crop((left, top, left + resolution, top + resolution))


def crop_rng(sample_id: str) -> np.random.Generator:
    """A crop position fixed per sample: independent of processing order, stable across reruns."""
    digest = hashlib.sha256(sample_id.encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))
