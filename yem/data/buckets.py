"""Aspect-ratio buckets: each photo trains at the size closest to its own shape, with about data.resolution² pixels.

People's photos are 3:4 and 9:16 portraits, 4:3 and 16:9 landscapes, a few squares. Cropping them all to a centred
square throws away a quarter of a portrait; a bucket keeps the shape and crops only the sliver that separates the
photo's aspect ratio from the bucket's. At resolution R the buckets are:

  - the square R × R (so square photos train exactly as without buckets);
  - for each short side s = 64, 128, … below R, the long side l = the largest multiple of 64 with s × l ≤ R², as
    s × l and l × s, while l / s ≤ MAX_ASPECT and l stays within what the model's position embedding covers.

Sides are multiples of 64: SD3 needs 16 (VAE ×8, patch 2), 64 keeps the token grid regular. At 1024 px this gives
the familiar 1024², 960×1088, 896×1152, 832×1216, 768×1344, 704×1472 and 640×1600 (each also turned). Low
resolutions have few buckets (128 px: the square alone; 256 px: 256², 192×320, 320×192).
"""

import math
from dataclasses import dataclass
from typing import Literal

from yem.errors import DataError

STEP = 64  # bucket sides are multiples of this (the square bucket is data.resolution itself)
MAX_ASPECT = 2.5  # wider than 21:9 (2.33); a 1:4 panorama is cropped to the widest bucket, with a warning


@dataclass(frozen=True, order=True, slots=True)
class Bucket:
    width: int  # pixels
    height: int

    @property
    def label(self) -> str:
        return f"{self.width}×{self.height}"

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @classmethod
    def parse(cls, label: str) -> "Bucket":
        width, height = label.split("×")
        return cls(int(width), int(height))


def buckets_for(resolution: int, mode: Literal["auto", "off"], max_side: int | None = None) -> list[Bucket]:
    """Every bucket at `resolution`, squarest first; `max_side`: the longest side the model's position embedding
    covers (None: unbounded). `off` gives the square alone."""
    if max_side is not None and resolution > max_side:
        raise DataError(f"data.resolution: larger than the base model's position embedding covers (got {resolution} "
                        f"> {max_side} px). Lower data.resolution to at most {max_side}.")
    found = [Bucket(resolution, resolution)]
    if mode == "off":
        return found
    for short in range(STEP, resolution, STEP):
        long = resolution * resolution // short // STEP * STEP
        if long <= short or long / short > MAX_ASPECT or (max_side is not None and long > max_side):
            continue
        found += [Bucket(short, long), Bucket(long, short)]
    return sorted(set(found), key=lambda b: (abs(math.log(b.aspect)), b.width))


def nearest(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to the image's (in log ratio: 2:1 and 1:2 are equally far from 1:1)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.aspect) - aspect), abs(math.log(b.aspect)), b.width))


def clamped(width: int, height: int, buckets: list[Bucket]) -> bool:
    """Whether the image is wider than the widest bucket (or taller than the tallest), so its crop is forced."""
    aspect = width / height
    return aspect > max(b.aspect for b in buckets) * 1.001 or aspect < min(b.aspect for b in buckets) / 1.001


def crop_share(width: int, height: int, bucket: Bucket) -> float:
    """The share of the image that fitting it to `bucket`'s aspect ratio cuts away (0 when they match)."""
    ratio = (width / height) / bucket.aspect
    return 1 - min(ratio, 1 / ratio)


def clamp_note(clamps: dict[str, tuple[int, int, Bucket]], resolution: int, buckets: list[Bucket]) -> str | None:
    """One warning for every image cropped hard because no bucket is as wide (or as tall) as it: name -> (width,
    height, bucket)."""
    if not clamps:
        return None
    shown = [f"{name} {w}×{h} -> {b.label} loses {crop_share(w, h, b):.0%}" for name, (w, h, b) in clamps.items()]
    listed = "; ".join(shown[:3]) + (f"; and {len(shown) - 3} more" if len(shown) > 3 else "")
    widest = max(buckets, key=lambda b: b.aspect)
    return (f"data.buckets: {len(shown)} image(s) wider or taller than any bucket at data.resolution {resolution} "
            f"(the widest is {widest.label}), cropped to the nearest ({listed}). Crop them yourself to choose what "
            f"stays{', or raise data.resolution (512 or more has buckets up to 2.4:1)' if len(buckets) < 5 else ''}.")


def counts(sizes: list[Bucket]) -> dict[str, int]:
    """Bucket label -> how many images it holds, largest group first."""
    tally: dict[str, int] = {}
    for bucket in sizes:
        tally[bucket.label] = tally.get(bucket.label, 0) + 1
    return dict(sorted(tally.items(), key=lambda item: (-item[1], item[0])))
