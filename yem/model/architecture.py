"""The shape of an SD3 model, read without loading its weights: what the memory footprint is computed from.

Sizes come from the model's files when they are on disk (transformer/config.json for the architecture, safetensors
headers for exact parameter counts: no weights are read) and otherwise from the known SD3 family
(`KNOWN_MODELS`: parameters and stored buffers of the diffusers/transformers models built on the meta device).
"""

import json
import math
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

from yem.errors import ModelError

VAE_SCALE = 8  # SD3's VAE: 8 px per latent position


@dataclass(frozen=True, slots=True)
class Architecture:
    name: str
    layers: int
    heads: int
    head_dim: int
    patch_size: int
    joint_dim: int  # width of the text embeddings (T5's: 4096 in SD3)
    qk_norm: bool
    dual_attention_layers: int  # MMDiT-X blocks with a second, image-only attention
    transformer_params: int  # parameters and stored buffers (the positional embedding)
    vae_params: int
    vae_width: int  # the VAE's first block width: its activations at full resolution scale with it
    text_encoders: dict[str, tuple[int, int]] = field(default_factory=dict)  # clip_l/clip_g/t5 -> (params, width)
    sample_size: int = 128  # latent side the model was trained at (transformer config): 128 × 8 = 1024 px in SD3
    pos_embed_max_size: int | None = 192  # patches per side the position embedding covers (None: no limit)

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def native_resolution(self) -> int:
        """The image side the model was trained at: 1024 px for SD3 and SD3.5."""
        return self.sample_size * VAE_SCALE

    @property
    def max_side(self) -> int | None:
        """The longest image side the position embedding covers (SD3-medium: 192 patches × 2 × 8 = 3072 px)."""
        return self.pos_embed_max_size * self.patch_size * VAE_SCALE if self.pos_embed_max_size else None


# SD3's text encoders and VAE, shared by every SD3 and SD3.5 model, counted on the meta device from the configs in
# notes/diffusers.md §4 (transformers 5.24, diffusers 0.42). T5's input embedding is tied to `shared` and held once:
# 4.76 B params, 9.5 GB in fp16 (the 4.89 B in the notes counts that 131.6 M embedding twice).
SD3_TEXT_ENCODERS = {"clip_l": (123_650_304, 768), "clip_g": (694_659_840, 1280), "t5": (4_762_310_656, 4096)}
SD3_VAE_PARAMS = 83_819_683


def _sd3(name: str, layers: int, transformer: int, pos_embed: int, qk_norm: bool, dual: int) -> Architecture:
    """`pos_embed`: the stored position embedding, width × pos_embed_max_size² values."""
    return Architecture(name=name, layers=layers, heads=layers, head_dim=64, patch_size=2, joint_dim=4096,
                        qk_norm=qk_norm, dual_attention_layers=dual, transformer_params=transformer + pos_embed,
                        vae_params=SD3_VAE_PARAMS, vae_width=128, text_encoders=dict(SD3_TEXT_ENCODERS),
                        sample_size=128, pos_embed_max_size=math.isqrt(pos_embed // (64 * layers)))


_SD35_LARGE = _sd3("SD3.5-large", 38, 8_056_627_520, 89_653_248, True, 0)
KNOWN_MODELS = {
    "stabilityai/stable-diffusion-3-medium-diffusers": _sd3("SD3-medium", 24, 2_028_328_000, 56_623_104, False, 0),
    "stabilityai/stable-diffusion-3.5-medium": _sd3("SD3.5-medium", 24, 2_243_171_520, 226_492_416, True, 13),
    "stabilityai/stable-diffusion-3.5-large": _SD35_LARGE,
    "stabilityai/stable-diffusion-3.5-large-turbo": replace(_SD35_LARGE, name="SD3.5-large-turbo"),
}
TEXT_FOLDERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"}


def architecture_from_folder(folder: Path, name: str) -> Architecture:
    """Read a diffusers SD3 folder: configs, and parameter counts from the safetensors headers."""
    config = _json(folder / "transformer" / "config.json")
    vae = _json(folder / "vae" / "config.json")
    encoders = {}
    for key, sub in TEXT_FOLDERS.items():
        if (folder / sub / "config.json").exists():
            text = _json(folder / sub / "config.json")
            counted = stored_params(folder / sub) or SD3_TEXT_ENCODERS[key][0]
            encoders[key] = (counted, text.get("d_model") or text["hidden_size"])
    return Architecture(
        name=name, layers=config["num_layers"], heads=config["num_attention_heads"],
        head_dim=config["attention_head_dim"], patch_size=config["patch_size"],
        joint_dim=config["joint_attention_dim"], qk_norm=bool(config.get("qk_norm")),
        dual_attention_layers=len(config.get("dual_attention_layers") or ()),
        transformer_params=stored_params(folder / "transformer") or _known_size(config),
        vae_params=stored_params(folder / "vae") or SD3_VAE_PARAMS, vae_width=vae["block_out_channels"][0],
        text_encoders=encoders, sample_size=config["sample_size"], pos_embed_max_size=config.get("pos_embed_max_size"))


def stored_params(folder: Path) -> int:
    """Elements in every safetensors file of a folder, from the headers alone (8-byte length + JSON)."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += count
    return total


def _known_size(config: dict) -> int:
    """A transformer without safetensors (.bin only): the known model with the same depth, else SD3-medium's."""
    same = [a for a in KNOWN_MODELS.values() if a.layers == config["num_layers"]]
    return (same or list(KNOWN_MODELS.values()))[0].transformer_params


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: cannot read the model config ({e}). Check that the model folder is complete.") from e


def architecture_for(model_id: str, revision: str | None = None) -> Architecture:
    """tiny: the folder yem builds; a local folder: its files; a hub id: its downloaded copy, else the table."""
    if model_id == "tiny":
        from yem.model.tiny import ensure_tiny_model

        return architecture_from_folder(ensure_tiny_model(), "tiny SD3")
    folder = Path(model_id).expanduser()
    if folder.is_dir():
        return architecture_from_folder(folder, folder.name)
    cached = _hub_snapshot(model_id, revision)
    if cached is not None and (cached / "transformer" / "config.json").exists():
        return architecture_from_folder(cached, model_id.split("/")[-1])
    if model_id in KNOWN_MODELS:
        return KNOWN_MODELS[model_id]
    raise ModelError(f"model.id: {model_id} is not downloaded and not a model yem knows the size of (got "
                     f"{model_id!r}). Download it (`hf download {model_id}`) to estimate its memory.")


def _hub_snapshot(model_id: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, revision=revision, local_files_only=True))
    except Exception:  # not cached, not a valid id, offline: fall back to the known table
        return None
