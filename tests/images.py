"""Synthetic images for the demo data and the tests: a toy subject ("sks dog") on varied backgrounds."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def toy_subject(seed: int, size: tuple[int, int] = (160, 128)) -> Image.Image:
    """The same brown creature (body, head, ears, eye) at a seed-dependent place, scale and background."""
    rng = np.random.default_rng(seed)
    width, height = size
    background = tuple(int(v) for v in rng.integers(90, 230, size=3))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    for _ in range(6):  # background clutter
        x, y = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(4, 14))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(60, 250, size=3)))
    scale = rng.uniform(0.8, 1.2) * min(size) / 128
    cx, cy = width / 2 + rng.uniform(-15, 15), height / 2 + rng.uniform(-8, 8)
    brown, dark = (139, 84, 40), (60, 35, 20)
    draw.ellipse([cx - 34 * scale, cy - 8 * scale, cx + 26 * scale, cy + 30 * scale], fill=brown)  # body
    draw.ellipse([cx + 10 * scale, cy - 30 * scale, cx + 44 * scale, cy + 2 * scale], fill=brown)  # head
    draw.polygon([(cx + 12 * scale, cy - 24 * scale), (cx + 18 * scale, cy - 42 * scale),
                  (cx + 24 * scale, cy - 26 * scale)], fill=dark)  # ear
    draw.ellipse([cx + 30 * scale, cy - 20 * scale, cx + 35 * scale, cy - 15 * scale], fill="black")  # eye
    for leg in (-24, -8, 6, 16):
        draw.rectangle([cx + leg * scale, cy + 24 * scale, cx + (leg + 6) * scale, cy + 40 * scale], fill=dark)
    return image


def write_toy_dataset(folder: Path, count: int, size: tuple[int, int] = (160, 128), first_seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"dog{i:02d}.png"
        toy_subject(first_seed + i, size).save(path)
        paths.append(path)
    return paths
