"""Loading SD3 components: the only caller of `from_pretrained`. Each stage loads only what it needs.

`model.id` is "tiny" (the offline model yem builds), a local diffusers folder, or a Hugging Face hub id
(pinned by `model.revision`). Hub downloads and gated repos fail with a message that says what to do.
"""

import functools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from yem.errors import ModelError
from yem.model.tiny import ensure_tiny_model
from yem.params import ModelParams

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
    if folder.exists() or model.id.startswith((".", "/", "~")) or not is_hub_id(model.id):
        check_pipeline_folder(folder, model.id)
        return str(folder), {"local_files_only": True}
    offline = {} if hub_reachable() else {"local_files_only": True}  # the local cache, without retry noise
    return model.id, {"revision": model.revision, **offline}


@functools.cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hub (or the HTTPS proxy in between) accepts a connection, asked once per process. Unreachable,
    the libraries would retry each file for about a minute; instead a model then loads from the local cache or
    fails at once with one line. HF_HUB_OFFLINE=1 counts as unreachable."""
    import socket
    import threading
    import urllib.request
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlsplit(constants.ENDPOINT)
    via = urllib.request.getproxies().get(endpoint.scheme)
    target = urlsplit(via) if via and not urllib.request.proxy_bypass(endpoint.hostname) else endpoint
    address = (target.hostname, target.port or (443 if target.scheme == "https" else 80))
    answered = []

    def connect() -> None:  # in a thread: a name lookup that hangs is bounded by the join below too
        try:
            socket.create_connection(address, timeout=timeout_s).close()
            answered.append(True)
        except OSError:
            pass

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return bool(answered)


def transformer_config(model: ModelParams) -> dict:
    from diffusers import SD3Transformer2DModel

    source, kwargs = model_source(model)
    with _explained(model, "transformer"):
        return dict(SD3Transformer2DModel.load_config(source, subfolder="transformer", **kwargs))


def load_text_encoder(model: ModelParams, which: TextEncoder, dtype, device) -> tuple[Any, Any]:
    """One text encoder and its tokenizer, in `dtype` on `device`, in eval mode and frozen."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    encoder_folder, tokenizer_folder = TEXT_SUBFOLDERS[which]
    cls = T5EncoderModel if which == "t5" else CLIPTextModelWithProjection
    source, kwargs = model_source(model)
    with _explained(model, f"{encoder_folder} and {tokenizer_folder}"):
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder=tokenizer_folder, **kwargs)
        encoder = cls.from_pretrained(source, subfolder=encoder_folder, dtype=dtype, **kwargs)
    return tokenizer, encoder.to(device).eval().requires_grad_(False)


def load_vae(model: ModelParams, device):
    """The VAE, always in fp32: half-precision VAE encodes produce NaN latents on some images."""
    import torch
    from diffusers import AutoencoderKL

    source, kwargs = model_source(model)
    with _explained(model, "vae"):
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **_dtype_kwarg(torch.float32), **kwargs)
    return vae.to(device).eval().requires_grad_(False)


def load_transformer(model: ModelParams, dtype, device):
    """The frozen transformer in `dtype` on `device`. On CUDA the weights go straight to the GPU (diffusers'
    device_map, which also reserves their memory in one block first): no copy of them in CPU memory, and
    0.97 → 0.80 s for SD3-medium on an H100."""
    import torch
    from diffusers import SD3Transformer2DModel

    source, kwargs = model_source(model)
    placement = {"device_map": torch.device(device)} if torch.device(device).type == "cuda" else {}
    with _explained(model, "transformer"):
        transformer = SD3Transformer2DModel.from_pretrained(source, subfolder="transformer", **_dtype_kwarg(dtype),
                                                            **placement, **kwargs)
    return transformer.to(device).requires_grad_(False)


def quantize_frozen_base(transformer, kind: str):
    """Store the frozen Linear weights of the transformer blocks in int8 (optimum-quanto, weight-only: each
    matmul dequantizes to the compute dtype), before the adapter is attached; peft wraps the quantized Linears
    like plain ones. Embedders, final norm and output projection stay in the training dtype. `kind` "none"
    returns the transformer untouched."""
    if kind == "none":
        return transformer
    try:
        from optimum.quanto import freeze, qint8, quantize
    except ImportError:
        raise ModelError("train.quantize_base: int8 needs optimum-quanto, which is not installed. Install it "
                         "(`pip install 'yem[lowmem]'`), or set train.quantize_base: none.") from None
    quantize(transformer, weights=qint8, include="transformer_blocks.*")
    freeze(transformer)  # int8 weights replace the float ones, module by module
    return transformer


def load_training_scheduler(model: ModelParams):
    """A fresh flow-matching scheduler: its un-stepped sigma table (1000 entries, shift applied) for training."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    source, kwargs = model_source(model)
    with _explained(model, "scheduler"):
        return FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)


def load_render_pipeline(model: ModelParams, dtype, device):
    """The SD3 pipeline without its text encoders: rendering uses the cached prompt embeddings."""
    from diffusers import StableDiffusion3Pipeline

    source, kwargs = model_source(model)
    no_text = {name: None for pair in TEXT_SUBFOLDERS.values() for name in pair}
    _quiet_diffusers()
    with _explained(model, "pipeline"):
        pipeline = StableDiffusion3Pipeline.from_pretrained(source, **_dtype_kwarg(dtype), **no_text, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def is_hub_id(text: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def check_pipeline_folder(folder: Path, given: str) -> None:
    """Refuse, before any weights load, a folder that is missing or is not an SD3 diffusers pipeline."""
    if not folder.is_dir():
        raise ModelError(f"model.id: folder {given} does not exist (nor is it a Hub id like namespace/name). Fix "
                         f"the path, or use a hub id such as stabilityai/stable-diffusion-3-medium-diffusers.")
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelError(f"model.id: {given} is not a diffusers pipeline folder (got no model_index.json in it). "
                         f"Point it at a folder saved by StableDiffusion3Pipeline, e.g. `hf download "
                         f"stabilityai/stable-diffusion-3-medium-diffusers --local-dir <folder>`.")
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise ModelError(f"model.id: {index} is unreadable or not a JSON object (got {' '.join(str(e).split())}). "
                         f"Download the model again.") from None
    if class_name not in PIPELINE_CLASSES:
        raise ModelError(f"model.id: {given} is not an SD3 pipeline (got {class_name or 'no _class_name'} in "
                         f"model_index.json). Point it at an SD3 or SD3.5 diffusers folder, e.g. a download of "
                         f"stabilityai/stable-diffusion-3-medium-diffusers.")


@contextmanager
def _explained(model: ModelParams, part: str) -> Iterator[None]:
    """Turn hub and file errors met while loading `part` (vae, transformer, ...) into one line that says what to do."""
    import warnings

    from safetensors import SafetensorError

    try:
        with warnings.catch_warnings():  # diffusers still passes it; says nothing to someone loading a model
            warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")
            yield
    except (OSError, ValueError, SafetensorError) as e:
        hub_error = _hub_error(e)
        detail = " ".join(str(hub_error or e).split())[:300]
        if hub_error is not None:
            raise ModelError(_hub_message(model, part, hub_error, detail)) from None
        raise ModelError(f"model.id {model.id!r}: cannot load its {part} (got {detail}). The model is incomplete or "
                         f"corrupt: download it again, or point model.id at a complete SD3 diffusers folder.") from None


def _hub_error(error: BaseException) -> BaseException | None:
    """The huggingface_hub or connection error behind `error`: diffusers and transformers re-raise them as
    plain OSErrors, keeping the original as __cause__ or __context__."""
    from huggingface_hub import errors as hub

    kinds = (hub.HfHubHTTPError, hub.EntryNotFoundError, hub.HFValidationError, ConnectionError)
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kinds):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _hub_message(model: ModelParams, part: str, error: BaseException, detail: str) -> str:
    from huggingface_hub import errors as hub

    where = f"model.id {model.id!r}" + (f" (model.revision {model.revision})" if model.revision else "")
    if isinstance(error, hub.GatedRepoError):
        return (f"{where}: gated model, and this machine has no access (got {detail[:120]}). Accept its license at "
                f"https://huggingface.co/{model.id}, then log in (`hf auth login`) or set HF_TOKEN.")
    if isinstance(error, hub.RepositoryNotFoundError):
        return (f"{where}: no such model on the Hub, or it is private. Check the id, log in (`hf auth login`), or "
                f"set model.id to a local folder.")
    if isinstance(error, hub.RevisionNotFoundError):
        return f"{where}: no such revision. Set model.revision to a branch, tag or commit of that repository."
    if isinstance(error, (hub.LocalEntryNotFoundError, ConnectionError)):
        return (f"{where}: not downloaded, and the Hub cannot be reached (offline). Log in and download it while "
                f"online (`hf auth login`, then `hf download {model.id}`), or set model.id to a local folder.")
    if isinstance(error, hub.EntryNotFoundError):
        return (f"{where}: has no {part} (got {detail}). Use an SD3 diffusers repository, e.g. "
                f"stabilityai/stable-diffusion-3-medium-diffusers.")
    return f"{where}: the Hub refused the download (got {detail}). Check the id and your login, then retry."
