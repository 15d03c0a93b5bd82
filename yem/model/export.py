"""LoRA files in the layouts SD3 tools read: diffusers (yem's own), ComfyUI, and kohya (sd-scripts, Forge).

One transformer LoRA, written down three ways. Sources, read in the tools themselves: Comfy-Org/ComfyUI
comfy/lora.py (`model_lora_keys_unet`, `load_lora`), comfy/utils.py (`mmdit_to_diffusers`),
comfy/weight_adapter/lora.py (the scale); kohya-ss/sd-scripts networks/lora_sd3.py. tests/test_export.py checks
our files against ComfyUI's key mapping, written there as data.

- diffusers: `transformer.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r); alpha is only in the
  `lora_adapter_metadata` header. `StableDiffusion3Pipeline.load_lora_weights` refuses a file with any tensor
  whose name lacks "lora", so this file cannot also hold `.alpha` tensors. yem writes it with the scale folded
  into B (B × alpha / r, alpha recorded as r): ComfyUI, which never reads the header, then applies it at the
  same strength as diffusers and peft.
- comfyui: the same tensors plus a scalar `transformer.<module>.alpha` each. ComfyUI maps the diffusers names
  onto its MMDiT itself but never reads the header: it scales by alpha / r only when an `.alpha` tensor exists,
  by 1.0 otherwise.
- kohya: `lora_unet_<SAI MMDiT module, dots as underscores>.lora_down.weight / .lora_up.weight / .alpha`.
  SAI's MMDiT has one Linear for q, k and v together, so their LoRAs fuse into one:
  down = cat(A_q, A_k, A_v) (3r, in), up = block_diag(B_q, B_k, B_v) (3h, 3r), and as kohya and ComfyUI both
  scale by alpha / down.shape[0], the fused alpha is 3·alpha, which keeps the scale alpha / r.

Reading any layout gives the same `Module`s (down, up, alpha per diffusers module name), so each conversion goes
through that neutral form.
"""

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from yem import __version__
from yem.errors import YemError
from yem.model import lora_file

FORMATS = ("diffusers", "comfyui", "kohya")
PREFIX = "transformer."
KOHYA_PREFIX = "lora_unet_"

# diffusers module inside transformer_blocks.<i> -> (SAI module inside joint_blocks.<i>, slot in the fused qkv)
BLOCK_MODULES: dict[str, tuple[str, int | None]] = {
    "attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1),
    "attn.to_v": ("x_block.attn.qkv", 2), "attn.to_out.0": ("x_block.attn.proj", None),
    "attn.add_q_proj": ("context_block.attn.qkv", 0), "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2), "attn.to_add_out": ("context_block.attn.proj", None),
    "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),  # SD3.5 dual attention
    "attn2.to_v": ("x_block.attn2.qkv", 2), "attn2.to_out.0": ("x_block.attn2.proj", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None), "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None), "ff_context.net.2": ("context_block.mlp.fc2", None),
    "norm1.linear": ("x_block.adaLN_modulation.1", None),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", None),
}
# diffusers module outside the blocks -> SAI module
TOP_MODULES: dict[str, str] = {
    "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
}
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_KOHYA_BLOCK = re.compile(r"^joint_blocks_(\d+)_(.+)$")
_DIFFUSERS_KEY = re.compile(r"^transformer\.(.+)\.(lora_A\.weight|lora_B\.weight|alpha)$")
_KOHYA_KEY = re.compile(r"^lora_unet_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


@dataclass(frozen=True)
class Module:
    """The LoRA of one Linear: ΔW = alpha / r · up @ down."""
    down: np.ndarray  # (r, in): peft lora_A, kohya lora_down
    up: np.ndarray  # (out, r): peft lora_B, kohya lora_up
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> np.ndarray:
        """ΔW (out, in) in float64."""
        return self.scale * (self.up.astype(np.float64) @ self.down.astype(np.float64))


def file_name(fmt: str, name: str) -> str:
    """What each format's file is called: diffusers keeps the name `load_lora_weights` looks for; the others carry
    the LoRA's name (what ComfyUI's LoRA list shows), made safe for any file system."""
    safe = re.sub(r"[^\w.-]+", "-", name).strip("-.") or "lora"
    return lora_file.WEIGHT_NAME if fmt == "diffusers" else f"{safe}_{fmt}.safetensors"


def lora_name(path: Path) -> str:
    """The LoRA's name: the one the card stage recorded in its header (export.name), else the one `file_name` gave
    it (`rex_kohya.safetensors` -> rex), else "lora"."""
    recorded = lora_file.read_metadata(path).get("yem.name")
    if recorded:
        return recorded
    if path.name == lora_file.WEIGHT_NAME:
        return "lora"
    return next((path.stem.removesuffix(f"_{fmt}") for fmt in FORMATS if path.stem.endswith(f"_{fmt}")), path.stem)


def convert(source: Path, fmt: str, target: Path) -> Path:
    """Write the LoRA in `source` (any known layout) to `target` in layout `fmt`."""
    modules, metadata = read(source)
    write(modules, metadata, fmt, target)
    return target


def read(path: Path) -> tuple[dict[str, Module], dict[str, str]]:
    """The LoRA in `path` as modules keyed by their diffusers name, and the file's header metadata."""
    tensors, metadata = lora_file.read_tensors(path), lora_file.read_metadata(path)
    if tensors and all(key.startswith(KOHYA_PREFIX) for key in tensors):
        return _from_kohya(tensors, path), metadata
    if tensors and all(key.startswith(PREFIX) for key in tensors):
        return _from_diffusers(tensors, metadata, path), metadata
    odd = next((key for key in tensors if not key.startswith((PREFIX, KOHYA_PREFIX))), "no tensors")
    raise YemError(f"{path}: not an SD3 transformer LoRA in a layout yem knows (got '{odd}'). yem reads the "
                   f"diffusers (transformer.*), ComfyUI and kohya (lora_unet_*) layouts, transformer only.")


def write(modules: dict[str, Module], metadata: dict[str, str], fmt: str, path: Path) -> None:
    """Write `modules` in layout `fmt`, keeping the header's provenance and naming the layout in it."""
    if fmt not in FORMATS:
        raise YemError(f"export format: unknown (got '{fmt}'). Use one of {', '.join(FORMATS)}.")
    tensors, header = _to_diffusers(modules, metadata, 1.0 if fmt == "diffusers" else None)
    if fmt == "comfyui":
        tensors = {**tensors, **_alpha_tensors(tensors, header)}
    elif fmt == "kohya":
        tensors = _to_kohya(modules)
    header = {**header, "yem.layout": fmt}
    header.setdefault("yem.version", __version__)
    path.parent.mkdir(parents=True, exist_ok=True)
    lora_file.write(path, {k: np.require(v, requirements="C") for k, v in sorted(tensors.items())}, header)


def _from_diffusers(tensors: dict[str, np.ndarray], metadata: dict[str, str], path: Path) -> dict[str, Module]:
    parts = _group(tensors, _DIFFUSERS_KEY, path)
    config = lora_file.config_in(metadata)
    scale = _config_scale(config) if config else None
    modules = {}
    for name, part in parts.items():
        down, up = _pair(part, "lora_A.weight", "lora_B.weight", name, path)
        # ComfyUI's .alpha wins; else the peft config diffusers reads; with neither, diffusers uses alpha = r
        alpha = part["alpha"].item() if "alpha" in part else (scale or 1.0) * len(down)
        modules[name] = Module(down, up, alpha)
    return modules


def _to_diffusers(modules: dict[str, Module], metadata: dict[str, str], scale: float | None
                  ) -> tuple[dict, dict[str, str]]:
    """Tensors and header for diffusers: one rank and one alpha for all (peft's config holds one of each). The
    scale is `scale` (any difference folded into up), or when None the one most modules have."""
    if not modules:
        raise YemError("LoRA: has no transformer modules. Export a LoRA that yem trained.")
    rank = max(module.rank for module in modules.values())
    scale = scale or Counter(module.scale for module in modules.values()).most_common(1)[0][0]
    tensors = {}
    for name, module in modules.items():
        module = _conformed(module, rank, scale)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = module.down
        tensors[f"{PREFIX}{name}.lora_B.weight"] = module.up
    config = _config_for(metadata, sorted(modules), rank, scale)
    prefixed = {f"{PREFIX}{key}": value for key, value in config.items()}
    return tensors, {**metadata, "format": "pt",
                     lora_file.ADAPTER_METADATA: json.dumps(prefixed, indent=2, sort_keys=True)}


def _conformed(module: Module, rank: int, scale: float) -> Module:
    """The same ΔW at `rank` (zero rows/columns added) and `scale` (the difference folded into up)."""
    if module.rank == rank and module.scale == scale:
        return module
    ratio = module.scale / scale
    down = np.zeros((rank, module.down.shape[1]), module.down.dtype)
    up = np.zeros((module.up.shape[0], rank), module.up.dtype)
    down[:module.rank] = module.down
    up[:, :module.rank] = module.up * ratio
    return Module(down, up, scale * rank)


def _alpha_tensors(tensors: dict[str, np.ndarray], header: dict[str, str]) -> dict[str, np.ndarray]:
    """ComfyUI's `<module>.alpha`: a 0-d float32 per module, the lora_alpha diffusers reads from the header."""
    config = lora_file.config_in(header)
    alpha = np.array(_config_scale(config) * config["r"], dtype=np.float32)
    suffix = ".lora_A.weight"
    return {key[:-len(suffix)] + ".alpha": alpha for key in tensors if key.endswith(suffix)}


def _config_scale(config: dict) -> float:
    """The scale peft gives every module: lora_alpha / r (or / sqrt(r) with rsLoRA)."""
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise YemError("lora_adapter_metadata: per-module rank or alpha patterns are not supported (got "
                       f"{config.get('rank_pattern') or config.get('alpha_pattern')}). Export a LoRA yem trained.")
    return config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])


def _config_for(metadata: dict[str, str], names: list[str], rank: int, scale: float) -> dict:
    """The source's peft config when it still describes these tensors, else one that does."""
    source = lora_file.config_in(metadata)
    targets = source.get("target_modules") or []
    covered = all(any(n == t or n.endswith("." + t) for t in targets) for n in names)
    if source and covered and source["r"] == rank and math.isclose(_config_scale(source), scale, rel_tol=1e-6):
        return source
    return {"peft_type": "LORA", "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True,
            "use_dora": False, **source, "r": rank, "lora_alpha": scale * rank, "use_rslora": False,
            "rank_pattern": {}, "alpha_pattern": {}, "target_modules": targets if covered else names}


def _to_kohya(modules: dict[str, Module]) -> dict[str, np.ndarray]:
    slots: dict[str, dict[int | None, Module]] = {}
    for name, module in modules.items():
        sai, slot = _sai_name(name)
        slots.setdefault(sai, {})[slot] = module
    tensors = {}
    for sai, parts in slots.items():
        module = _sai_rows(sai, parts[None]) if None in parts else _fuse(parts)
        key = KOHYA_PREFIX + sai.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = module.down
        tensors[f"{key}.lora_up.weight"] = module.up
        tensors[f"{key}.alpha"] = np.array(module.alpha, dtype=np.float32)
    return tensors


def _sai_name(name: str) -> tuple[str, int | None]:
    block = _BLOCK.match(name)
    if block and block[2] in BLOCK_MODULES:
        sai, slot = BLOCK_MODULES[block[2]]
        return f"joint_blocks.{block[1]}.{sai}", slot
    if name in TOP_MODULES:
        return TOP_MODULES[name], None
    raise YemError(f"LoRA module {name}: has no counterpart in SAI's MMDiT, so the kohya layout cannot hold it. "
                   f"Export diffusers or comfyui instead, or leave it out of train.targets.")


def _fuse(parts: dict[int, Module]) -> Module:
    """LoRAs of q, k, v (slots 0-2; a missing one stays zero) as one LoRA of the fused qkv Linear (3h, in)."""
    rank = max(module.rank for module in parts.values())
    scale = parts[min(parts)].scale
    first = parts[min(parts)]
    height, width, dtype = first.up.shape[0], first.down.shape[1], first.down.dtype
    down = np.zeros((3 * rank, width), dtype)  # (3r, in): cat(A_q, A_k, A_v)
    up = np.zeros((3 * height, 3 * rank), dtype)  # (3h, 3r): block_diag(B_q, B_k, B_v)
    for slot, module in parts.items():
        module = _conformed(module, rank, scale)
        down[slot * rank:(slot + 1) * rank] = module.down
        up[slot * height:(slot + 1) * height, slot * rank:(slot + 1) * rank] = module.up
    return Module(down, up, scale * 3 * rank)


def _sai_rows(sai: str, module: Module) -> Module:
    """diffusers' AdaLayerNormContinuous (out = 2·in: the last block's context norm, norm_out) orders its output
    (shift, scale); SAI's adaLN_modulation orders it (scale, shift). Swapping the halves of up is its own inverse."""
    if not (sai.endswith("adaLN_modulation.1") and module.up.shape[0] == 2 * module.down.shape[1]):
        return module
    shift, scale = np.split(module.up, 2, axis=0)
    return Module(module.down, np.concatenate([scale, shift]), module.alpha)


def _from_kohya(tensors: dict[str, np.ndarray], path: Path) -> dict[str, Module]:
    modules = {}
    for base, part in _group(tensors, _KOHYA_KEY, path).items():
        sai, names = _diffusers_names(base, path)
        down, up = _pair(part, "lora_down.weight", "lora_up.weight", base, path)
        # kohya and ComfyUI: no alpha means scale 1.0
        module = Module(down, up, part["alpha"].item() if "alpha" in part else float(len(down)))
        if None in names:
            modules[names[None]] = _sai_rows(sai, module)
        else:
            modules.update({names[slot]: piece for slot, piece in _split(module, path).items()})
    return modules


def _split(module: Module, path: Path) -> dict[int, Module]:
    """The fused qkv LoRA back as q, k, v. A block-diagonal up (what `_fuse` writes) splits into the original
    tensors; a dense one (kohya trained the fused Linear) gives each its rows of up and the whole down: the same
    ΔW. Projections whose up is all zero were not trained and are left out."""
    if module.up.shape[0] % 3:
        raise YemError(f"{path}: a qkv LoRA with {module.up.shape[0]} output rows, not a multiple of 3. "
                       f"The file is not an SD3 LoRA.")
    height, rank = module.up.shape[0] // 3, module.rank
    rows = [slice(i * height, (i + 1) * height) for i in range(3)]
    if rank % 3 == 0 and _block_diagonal(module.up, rows, rank // 3):
        r = rank // 3
        parts = {i: Module(module.down[i * r:(i + 1) * r], module.up[rows[i], i * r:(i + 1) * r], module.alpha / 3)
                 for i in range(3)}
    else:
        parts = {i: Module(module.down, module.up[rows[i]], module.alpha) for i in range(3)}
    return {i: part for i, part in parts.items() if np.any(part.up)}


def _block_diagonal(up: np.ndarray, rows: list[slice], r: int) -> bool:
    return not any(np.any(up[rows[i], j * r:(j + 1) * r]) for i in range(3) for j in range(3) if i != j)


def _diffusers_names(base: str, path: Path) -> tuple[str, dict[int | None, str]]:
    """A kohya module name (`joint_blocks_0_x_block_attn_qkv`) -> its SAI name and diffusers module(s) per slot."""
    block = _KOHYA_BLOCK.match(base)
    if block:
        matches = {slot: (sai, name) for name, (sai, slot) in BLOCK_MODULES.items()
                   if sai.replace(".", "_") == block[2]}
        if matches:
            sai = next(iter(matches.values()))[0]
            names = {slot: f"transformer_blocks.{block[1]}.{name}" for slot, (_, name) in matches.items()}
            return f"joint_blocks.{block[1]}.{sai}", names
    for name, sai in TOP_MODULES.items():
        if sai.replace(".", "_") == base:
            return sai, {None: name}
    raise YemError(f"{path}: kohya module lora_unet_{base} is not a Linear of SD3's MMDiT that yem maps. "
                   f"Is this an SD3 LoRA (not SDXL or Flux)?")


def _group(tensors: dict[str, np.ndarray], pattern: re.Pattern, path: Path) -> dict[str, dict[str, np.ndarray]]:
    """`<module>.<part>` keys -> {module: {part: tensor}}."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in tensors.items():
        match = pattern.match(key)
        if match is None:
            raise YemError(f"{path}: tensor '{key}' is not a LoRA weight or alpha. Only plain LoRA files (no DoRA, "
                           f"LoHa, LoKr) can be converted.")
        parts.setdefault(match[1], {})[match[2]] = tensor
    return parts


def _pair(part: dict[str, np.ndarray], down: str, up: str, name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if down not in part or up not in part:
        raise YemError(f"{path}: module {name} lacks its {down if down not in part else up} tensor. "
                       f"The file is incomplete; export it again from the training output.")
    return part[down], part[up]
