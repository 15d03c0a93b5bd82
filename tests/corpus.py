"""Builders of hostile input files, generated at test time: broken, odd-mode, rotated, huge and bomb images;
and small projects to run a stage on them.

PNGs are written chunk by chunk (zlib streaming), so a huge image costs kilobytes to create and nothing to hold,
and modes Pillow does not save (16-bit RGB) can be made exactly.
"""

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from tests.conftest import REPO
from tests.images import toy_subject
from yem.params import set_values

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GRAY, RGB, PALETTE, GRAY_ALPHA, RGBA = 0, 2, 3, 4, 6  # PNG colour types


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_from_array(path: Path, pixels: np.ndarray, color_type: int, extra: list[tuple[bytes, bytes]] = ()) -> Path:
    """A PNG of `pixels` (H, W[, C]) uint8 or uint16 exactly as given (16-bit stored big-endian)."""
    height, width = pixels.shape[:2]
    depth = 16 if pixels.dtype == np.uint16 else 8
    rows = pixels.astype(">u2" if depth == 16 else np.uint8).reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    chunks = [(b"IHDR", header), *extra, (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]
    path.write_bytes(PNG_SIGNATURE + b"".join(_chunk(kind, payload) for kind, payload in chunks))
    return path


def solid_png(path: Path, width: int, height: int, pixel: bytes, color_type: int) -> Path:
    """A large one-colour 8-bit PNG, streamed: the file is small, the decoded image is not."""
    compressor = zlib.compressobj(9)
    row = b"\x00" + pixel * width
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    path.write_bytes(PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    return path


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A PNG that declares `width`×`height` but holds one row: only a header check can refuse it cheaply."""
    header = struct.pack(">IIBBBBB", width, height, 8, GRAY, 0, 0, 0)
    data = zlib.compress(b"\x00" * (width + 1))
    path.write_bytes(PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    return path


def photo(path: Path, size: tuple[int, int] = (64, 48), color=(200, 40, 40), **save) -> Path:
    Image.new("RGB", size, color).save(path, **save)
    return path


def marked_photo(path: Path, orientation: int | None, size: tuple[int, int] = (64, 32)) -> Path:
    """A landscape photo, blue with a red 16×16 block at its stored top-left, and an EXIF orientation tag."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 16, 16))
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(path, quality=95, exif=exif.tobytes())
    return path


def truncated(path: Path, source: Path, keep: float = 0.5) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def png_with_bad_crc(path: Path, source: Path) -> Path:
    """Flip a byte inside the first IDAT chunk's data: the chunk's CRC no longer matches."""
    data = bytearray(source.read_bytes())
    data[data.index(b"IDAT") + 6] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def jpeg_with_bad_scan(path: Path, source: Path) -> Path:
    """A JPEG whose scan names a colour component its frame does not have: libjpeg stops decoding it."""
    data = bytearray(source.read_bytes())
    data[data.index(b"\xff\xda") + 5] = 9  # SOS: marker (2 bytes), length (2), count (1), first component id
    path.write_bytes(bytes(data))
    return path


# --- a small project to run stages in ---------------------------------------------------------------------

def small_project(root: Path, validation: list[str] | None = None) -> Path:
    """The repository's params.yaml (resolution 64, `validation` prompts if given) and three toy photos."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text().replace("resolution: 128 ", "resolution: 64 "))
    if validation is not None:
        set_values(root / "params.yaml", {"prompts.validation": validation})
    photos = root / "data" / "instance"
    photos.mkdir(parents=True)
    for i in range(3):
        toy_subject(i, (80, 72)).save(photos / f"dog{i}.png")
    return root


def preflight_args(project: Path) -> list[str]:
    build = project / "build"
    return ["--params", str(project / "params.yaml"), "--hardware", str(build / "preflight.json"), "--images",
            str(build / "images.json"), "--captions", str(build / "captions.json"), "--log",
            str(project / "logs/preflight.json")]


def preflight_stage(project: Path) -> subprocess.CompletedProcess:
    """The stage as DVC runs it: its own process, real exit status and stderr."""
    return subprocess.run([sys.executable, "-m", "stages.preflight", *preflight_args(project)], cwd=REPO,
                          capture_output=True, text=True)


def preflight_in_process(project: Path):
    from stages.preflight import main

    return CliRunner().invoke(main, preflight_args(project))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def latents_cached(project_dir: Path) -> tuple[Path, list[str], dict[str, bytes]]:
    """A small project whose preflight and latents stages have run: (project, the latents stage's arguments,
    a snapshot of build/ to compare with after a failing rerun)."""
    from stages.latents import main

    project = small_project(project_dir)
    assert preflight_in_process(project).exit_code == 0
    args = ["--params", str(project / "params.yaml"), "--hardware", str(project / "build/preflight.json"),
            "--images", str(project / "build/images.json"), "--out", str(project / "build/latents"), "--log",
            str(project / "logs/latents.json")]
    assert CliRunner().invoke(main, args).exit_code == 0
    return project, args, snapshot(project / "build")
