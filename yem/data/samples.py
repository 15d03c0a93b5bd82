"""Training samples: which files in a folder are images, which caption belongs to which image, what is refused.

A sample's id is `<kind>/<stem>` (kind: instance or prior). Every cache downstream is keyed by that id, never
by position, so shuffling can never pair a caption with another image's latents (diffusers #14430). A problem the
user must fix raises DataError; when a folder has several, all of them are reported at once, one line each.
"""

import codecs
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from yem.data.images import HEIF_SUFFIXES, IMAGE_SUFFIXES
from yem.errors import DataError

CAPTION_SUFFIX = ".txt"
# Photo formats people have that Pillow cannot read: say how to convert them instead of just "not an image".
CONVERT_HINTS = {".dng": "camera raw", ".cr2": "camera raw", ".nef": "camera raw", ".arw": "camera raw"}
HEIF_HINT = "HEIC/HEIF needs pillow-heif (pip install 'yem[heic]'; on a Mac it comes with yem). Install it, or export"
Kind = Literal["instance", "prior"]


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
    if suffix in HEIF_SUFFIXES - IMAGE_SUFFIXES:
        return f"{_shown(path)}: skipped, {HEIF_HINT} it as JPEG."
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
