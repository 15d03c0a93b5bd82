"""Loading SD3 components: the only caller of `from_pretrained`. Each stage loads only what it needs.

`model.id` is "tiny" (the offline model yem builds), a local diffusers folder, or a Hugging Face hub id
(pinned by `model.revision`). Hub downloads and gated repos fail with a message that says what to do.
"""

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal

from yem.errors import ModelError
from yem.params import ModelParams
from yem.tiny import ensure_tiny_model

TextEncoder = Literal["clip_l", "clip_g", "t5"]
# Where each text encoder and its tokenizer live in an SD3 diffusers folder.
TEXT_SUBFOLDERS = {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2"),
                   "t5": ("text_encoder_3", "tokenizer_3")}
PIPELINE_CLASSES = {"StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"}


def _dtype_kwarg(dtype) -> dict[str, Any]:
    """diffusers 0.42 takes `dtype` and warns on `torch_dtype`; earlier releases take `torch_dtype`."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype": dtype}


def _quiet_diffusers() -> None:
    from diffusers.utils import logging

    logging.disable_progress_bar()  # yem shows one bar per phase instead


def model_source(model: ModelParams) -> tuple[str, dict[str, Any]]:
    """What to pass to from_pretrained (a folder or a hub id) and the keyword arguments that go with it."""
    if model.id == "tiny":
        return str(ensure_tiny_model()), {"local_files_only": True}
    folder = Path(model.id).expanduser()
    if folder.exists() or model.id.startswith((".", "/", "~")):
        _check_pipeline_folder(folder, model.id)
        return str(folder), {"local_files_only": True}
    return model.id, {"revision": model.revision}


def transformer_config(model: ModelParams) -> dict:
    from diffusers import SD3Transformer2DModel

    source, kwargs = model_source(model)
    with _explained(model):
        return dict(SD3Transformer2DModel.load_config(source, subfolder="transformer", **kwargs))


def load_text_encoder(model: ModelParams, which: TextEncoder, dtype, device) -> tuple[Any, Any]:
    """One text encoder and its tokenizer, in `dtype` on `device`, in eval mode and frozen."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    encoder_folder, tokenizer_folder = TEXT_SUBFOLDERS[which]
    cls = T5EncoderModel if which == "t5" else CLIPTextModelWithProjection
    source, kwargs = model_source(model)
    with _explained(model):
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder=tokenizer_folder, **kwargs)
        encoder = cls.from_pretrained(source, subfolder=encoder_folder, dtype=dtype, **kwargs)
    return tokenizer, encoder.to(device).eval().requires_grad_(False)


def load_vae(model: ModelParams, device):
    """The VAE, always in fp32: half-precision VAE encodes produce NaN latents on some images."""
    import torch
    from diffusers import AutoencoderKL

    source, kwargs = model_source(model)
    with _explained(model):
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **_dtype_kwarg(torch.float32), **kwargs)
    return vae.to(device).eval().requires_grad_(False)


def load_transformer(model: ModelParams, dtype, device):
    from diffusers import SD3Transformer2DModel

    source, kwargs = model_source(model)
    with _explained(model):
        transformer = SD3Transformer2DModel.from_pretrained(source, subfolder="transformer", **_dtype_kwarg(dtype),
                                                            **kwargs)
    return transformer.to(device).requires_grad_(False)


def load_training_scheduler(model: ModelParams):
    """A fresh flow-matching scheduler: its un-stepped sigma table (1000 entries, shift applied) for training."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    source, kwargs = model_source(model)
    with _explained(model):
        return FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)


def load_render_pipeline(model: ModelParams, dtype, device):
    """The SD3 pipeline without its text encoders: rendering uses the cached prompt embeddings."""
    from diffusers import StableDiffusion3Pipeline

    source, kwargs = model_source(model)
    no_text = {name: None for pair in TEXT_SUBFOLDERS.values() for name in pair}
    _quiet_diffusers()
    with _explained(model):
        pipeline = StableDiffusion3Pipeline.from_pretrained(source, **_dtype_kwarg(dtype), **no_text, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def _check_pipeline_folder(folder: Path, given: str) -> None:
    index = folder / "model_index.json"
    if not folder.is_dir():
        raise ModelError(f"model.id: folder {given} does not exist. Fix the path, or use a hub id such as "
                         f"stabilityai/stable-diffusion-3-medium-diffusers.")
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, json.JSONDecodeError):
        class_name = None
    if class_name not in PIPELINE_CLASSES:
        raise ModelError(f"model.id: {given} is not an SD3 diffusers folder (model_index.json names "
                         f"{class_name or 'nothing'}). Point it at a folder saved by StableDiffusion3Pipeline, "
                         f"e.g. a download of stabilityai/stable-diffusion-3-medium-diffusers.")


@contextmanager
def _explained(model: ModelParams) -> Iterator[None]:
    """Turn hub and file errors into one line that says what to do."""
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    where = f"model.id {model.id!r}" + (f" (revision {model.revision})" if model.revision else "")
    try:
        yield
    except GatedRepoError:
        raise ModelError(f"{where}: gated model. Accept its license at https://huggingface.co/{model.id}, then "
                         f"log in (`hf auth login`) or set HF_TOKEN.") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{where}: no such model on the Hub (or it is private). Check the id, log in "
                         f"(`hf auth login`), or set model.id to a local folder.") from None
    except RevisionNotFoundError:
        raise ModelError(f"{where}: no such revision. Set model.revision to a branch, tag or commit of "
                         f"that repository.") from None
    except LocalEntryNotFoundError:
        raise ModelError(f"{where}: not downloaded, and the Hub cannot be reached. Download it while online "
                         f"(`hf download {model.id}`), or set model.id to a local folder.") from None
    except OSError as e:
        if "offline" in str(e).lower() or "connect" in str(e).lower() or "couldn't find" in str(e).lower():
            raise ModelError(f"{where}: not downloaded, and the Hub cannot be reached. Download it while online "
                             f"(`hf download {model.id}`), or set model.id to a local folder.") from None
        raise ModelError(f"{where}: cannot load ({' '.join(str(e).split())}). Check that it is a complete SD3 "
                         f"diffusers model.") from None
