"""LoRA on the SD3 transformer through peft, saved in the diffusers layout that every SD3 tool reads.

The adapter's metadata (rank, alpha, targets) is stored in the safetensors header; yem adds its own provenance
keys beside it. The saved file carries the scale in its weights: B × alpha / r, with alpha recorded as r. diffusers
and peft read alpha from the header, ComfyUI only from `.alpha` tensors (which diffusers refuses) and otherwise
uses scale 1, so a file whose scale is 1 is applied at the same strength by every loader. The trained alpha stays
in the `yem.alpha` header key.
"""

import difflib
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from yem import atomic
from yem.errors import YemError
from yem.model import lora_file


def attach(transformer: torch.nn.Module, rank: int, alpha: float, targets: list[str]) -> list[torch.nn.Parameter]:
    """Add a trainable LoRA adapter (B = 0, so it starts as the identity); return its fp32 parameters."""
    check_targets(transformer, targets)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                       target_modules=list(targets)))
    # peft creates them in the base dtype; fp32 keeps small updates from vanishing in bf16/fp16 rounding
    cast_training_params(transformer, dtype=torch.float32)
    return [p for p in transformer.parameters() if p.requires_grad]


@contextmanager
def disabled(transformer: torch.nn.Module) -> Iterator[None]:
    """The base model alone while inside: peft skips every adapter's path (the weights stay as they are)."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def check_targets(transformer: torch.nn.Module, targets: list[str]) -> None:
    """peft matches a target when a Linear's full name equals it or ends with '.<target>'."""
    names = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    suffixes = sorted({".".join(n.split(".")[-k:]) for n in names for k in (1, 2, 3)})
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            near = difflib.get_close_matches(target, suffixes, n=1)
            hint = f" Did you mean '{near[0]}'?" if near else " Examples: attn.to_q, attn.to_out.0, ff.net.2."
            raise YemError(f"train.targets: '{target}' matches no Linear layer of the SD3 transformer.{hint}")


def adapter_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights keyed as peft names them (`transformer_blocks.0.attn.to_q.lora_A.weight`)."""
    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def load_adapter_state(transformer: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(transformer, state)
    if result.unexpected_keys:
        raise YemError(f"checkpoint does not fit this adapter (unexpected {result.unexpected_keys[:3]}). "
                       f"Delete the checkpoint folder and rerun.")


def adapter_config(transformer: torch.nn.Module) -> dict:
    """The peft LoraConfig as a dict; its target modules sorted (peft keeps a set, whose order changes from one
    process to the next), so the same training writes a byte-identical file."""
    config = transformer.peft_config["default"].to_dict()
    return {**config, "target_modules": sorted(config["target_modules"])}


def scale_folded(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """The adapter with its scale alpha / r folded into every B (lora_B): the same ΔW at alpha = r."""
    if scale == 1:
        return state
    return {k: v * scale if ".lora_B." in k else v for k, v in state.items()}


def save(transformer: torch.nn.Module, path: Path, provenance: dict[str, str]) -> Path:
    """Write the adapter to `path` through diffusers' SD3 saver (diffusers layout + adapter metadata), its scale
    folded into B, adding yem's provenance to the header; atomically."""
    import tempfile

    from diffusers import StableDiffusion3Pipeline

    config = adapter_config(transformer)
    state = scale_folded(adapter_state(transformer), config["lora_alpha"] / config["r"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".lora-") as staging:
        StableDiffusion3Pipeline.save_lora_weights(
            staging, transformer_lora_layers=state, weight_name=path.name,
            transformer_lora_adapter_metadata={**config, "lora_alpha": config["r"]})
        written = Path(staging) / path.name
        lora_file.add_metadata(written, provenance)
        atomic.write_with(path, lambda tmp: shutil.copyfile(written, tmp))
    return path
