"""Training images and their captions: discovery, pairing by identity, and robust decoding to square RGB.

A sample's id is `<kind>/<stem>` (kind: instance or prior). Every cache downstream is keyed by that id, never
by position, so shuffling can never pair a caption with another image's latents (diffusers #14430).
"""

import hashlib
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from yem.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
CAPTION_SUFFIX = ".txt"
Kind = Literal["instance", "prior"]
# Pillow refuses images over ~179 MP as decompression bombs; real photos stay far below this higher bound.
Image.MAX_IMAGE_PIXELS = 400_000_000


@dataclass(frozen=True, slots=True)
class Sample:
    id: str  # "<kind>/<stem>": the key of its latents and its caption everywhere
    kind: Kind
    path: Path
    caption: str | None  # text of `<stem>.txt` beside the image, or None


@dataclass(frozen=True, slots=True)
class Discovery:
    samples: list[Sample]
    notes: list[str]  # files skipped or fixed up, for the user to read


def discover(folder: Path, kind: Kind, params_key: str) -> Discovery:
    """List the images in `folder` with their captions; raise DataError when the folder cannot be used."""
    if not folder.exists():
        raise DataError(f"{params_key}: folder {folder} does not exist. Create it and add images, or fix the path.")
    if not folder.is_dir():
        raise DataError(f"{params_key}: {folder} is a file, not a folder. Point it at the folder of images.")
    notes, samples, seen = [], [], {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue  # .DS_Store, editor swap files, our own temporaries
        suffix = path.suffix.lower()
        if suffix == CAPTION_SUFFIX:
            continue
        if suffix not in IMAGE_SUFFIXES:
            notes.append(f"{path}: skipped, not an image ({', '.join(sorted(IMAGE_SUFFIXES))}).")
            continue
        if not path.is_file():
            notes.append(f"{path}: skipped, not a readable file (a broken link or a folder).")
            continue
        key = unicodedata.normalize("NFC", path.stem).casefold()  # APFS/NTFS treat these as one name
        if key in seen:
            raise DataError(f"{path}: same name as {seen[key]} ({path.stem!r}), so their captions and caches "
                            f"would collide. Rename one of them.")
        seen[key] = path
        caption, note = read_caption(path.with_suffix(CAPTION_SUFFIX))
        notes += [note] if note else []
        samples.append(Sample(id=f"{kind}/{path.stem}", kind=kind, path=path, caption=caption))
    if not samples:
        raise DataError(f"{params_key}: no images in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}). "
                        f"Add some, or fix the path.")
    return Discovery(samples=samples, notes=notes)


def read_caption(path: Path) -> tuple[str | None, str | None]:
    """The caption text (whitespace collapsed) and a note for the user, if any."""
    if not path.exists():
        return None, None
    try:
        text = path.read_bytes().decode("utf-8-sig")  # tolerate the BOM Windows editors add
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: caption is not UTF-8 text ({e.reason} at byte {e.start}). "
                        f"Save it as UTF-8.") from None
    text = " ".join(text.split())
    if not text:
        return None, f"{path}: empty caption, using prompts.instance for this image."
    return text, None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image, upright (EXIF orientation applied), as 8-bit RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
    except FileNotFoundError:
        raise DataError(f"{path}: file disappeared. Rerun the pipeline (dvc repro).") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image (empty or corrupt file). Re-export it or remove it.") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{path}: image is too large to decode safely (over {Image.MAX_IMAGE_PIXELS:,} pixels). "
                        f"Downscale it first.") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot decode the image ({e}). The file is truncated or corrupt: "
                        f"re-export it or remove it.") from None
    return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: alpha is composited on white, 16-bit is scaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if pixels.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(pixels / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV and the above


def check_size(image: Image.Image, resolution: int, small_images: Literal["upscale", "refuse"],
               path: Path) -> str | None:
    """None when the image is large enough; a note when it will be upscaled; DataError when that is refused."""
    if min(image.size) >= resolution:
        return None
    if small_images == "refuse":
        raise DataError(f"{path}: {image.width}×{image.height} is smaller than data.resolution {resolution}. "
                        f"Use a larger image, lower data.resolution, or set data.small_images: upscale.")
    return f"{path}: {image.width}×{image.height} is smaller than data.resolution {resolution}; upscaled."


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
