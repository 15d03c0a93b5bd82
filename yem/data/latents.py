"""VAE latents for every training image, cached once: the VAE never loads during training.

Each sample's file holds the VAE posterior in SD3's scaled latent space, so training can draw a fresh latent
every step as the reference does (`latent_dist.sample()`), without the VAE:
  mean, std  (16, H/8, W/8)   mean = (μ - shift_factor)·scaling_factor,  std = σ·scaling_factor
and, with data.random_flip, flip_mean / flip_std for the mirrored image (training picks one per epoch). H × W is
the image's aspect-ratio bucket (yem.data.buckets), within the sizes the transformer's position embedding covers.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from yem import atomic, progress
from yem.data import buckets, cache, images
from yem.data.hashing import file_sha256
from yem.errors import DataError
from yem.hardware import fallbacks
from yem.hardware.record import Hardware
from yem.model import sd3
from yem.params import DataParams, ModelParams


def pixels(image: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> (1, 3, H, W) float32 in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


@torch.inference_mode()
def encode(vae, image: Image.Image, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (16, H/8, W/8), scaled into the space the transformer sees."""
    with fallbacks.sample("vae"):  # the first image: what MPS ran on the CPU, and its time
        posterior = vae.encode(pixels(image).to(backend)).latent_dist
        shift, scale = vae.config.shift_factor, vae.config.scaling_factor
        return ((posterior.mean - shift) * scale)[0].cpu(), (posterior.std * scale)[0].cpu()


def write_latents(model: ModelParams, settings: DataParams, hardware: Hardware, manifest: dict, root: Path,
                  out_dir: Path) -> list[str]:
    """Encode each image of the manifest (checked against its hash), cropped to its bucket, into
    `out_dir/<id>.safetensors`.

    The folder is built beside `out_dir` and replaces it only when complete: a bad image, a full disk or an
    interruption leaves the previous latents as they were.
    """
    vae = sd3.load_vae(model, hardware.backend)
    shapes = buckets.buckets_for(settings.resolution, settings.buckets, max_side(model, vae))
    index, sizes, notes, clamps = {}, {}, [], {}
    with atomic.staged_dir(out_dir) as staging, progress.bar(total=len(manifest), desc="latents", unit="img") as bar:
        for sample_id, entry in manifest.items():
            path = root / entry["path"]
            image, bucket, note = _training_image(path, entry["sha256"], sample_id, settings, shapes)
            if buckets.clamped(*image.size, shapes):
                clamps[path.name] = (*image.size, bucket)
            notes += [note] if note else []
            image = images.bucket_crop(image, bucket, settings.center_crop, images.crop_rng(sample_id))
            tensors = dict(zip(("mean", "std"), encode(vae, image, hardware.backend)))
            if settings.random_flip:
                tensors["flip_mean"], tensors["flip_std"] = encode(
                    vae, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), hardware.backend)
            file = f"{sample_id}.safetensors"
            cache.write_tensors(staging / file, tensors, {"id": sample_id, "source": entry["sha256"]})
            index[sample_id], sizes[sample_id] = file, bucket.label
            bar.update()
        cache.write_index(staging, {"samples": index, "buckets": sizes, "resolution": settings.resolution,
                                    "flip": settings.random_flip})
    return notes + list(filter(None, [buckets.clamp_note(clamps, settings.resolution, shapes)]))


def max_side(model: ModelParams, vae) -> int | None:
    """The longest image side the transformer's position embedding covers: pos_embed_max_size patches × patch
    size × the VAE's downsampling (SD3-medium: 192 × 2 × 8 = 3072 px); None when the config sets no limit."""
    config = sd3.transformer_config(model)
    if not config.get("pos_embed_max_size"):
        return None
    return config["pos_embed_max_size"] * config["patch_size"] * 2 ** (len(vae.config.block_out_channels) - 1)


def _training_image(path: Path, sha256: str, sample_id: str, settings: DataParams, shapes: list[buckets.Bucket]
                    ) -> tuple[Image.Image, buckets.Bucket, str | None]:
    """The upright image, its bucket and a note if it must be upscaled, after checking the file is the one
    preflight checked."""
    if file_sha256(path) != sha256:
        raise DataError(f"{path}: changed after preflight checked it. Rerun: dvc repro.")
    image = images.open_image(path, settings.resolution)
    bucket = buckets.nearest(image.width, image.height, shapes)
    return image, bucket, images.check_size(image, bucket, settings.small_images, path)
