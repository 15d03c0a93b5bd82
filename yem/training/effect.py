"""Does the trained LoRA do anything? A guard against shipping a file that leaves the model as it was.

Other Mac trainers have shipped LoRA files holding their initial weights. peft starts every adapter with B = 0, so
the LoRA's change to a weight, ΔW = alpha / r · B @ A, is exactly zero until training moves B. After training yem
checks both that the weights moved (ΔW ≠ 0 somewhere) and that this is measurable where it counts: the held-out
loss changes. The render stage adds the third check, base and LoRA renders that differ (yem.outputs.render).
"""

from dataclasses import dataclass

import torch

# A held-out loss that changes by less than this share is not a measurable effect (it is deterministic: the same
# noise, sigmas and images before and after, so any change comes from the adapter).
HELDOUT_CHANGE = 1e-4


@dataclass(frozen=True, slots=True)
class Effect:
    delta: float  # the largest ‖ΔW‖ / ‖W‖ over the adapted layers (0 when the weights never moved)
    heldout_change: float  # (after - before) / before of the held-out loss

    @property
    def moved(self) -> bool:
        return self.delta > 0

    @property
    def measurable(self) -> bool:
        return self.moved and abs(self.heldout_change) >= HELDOUT_CHANGE

    def warning(self) -> str | None:
        """One line for the user when the LoRA does nothing measurable; None when it works."""
        if not self.moved:
            return ("train: the LoRA's weights never moved from their initial values (ΔW = 0 in every layer), so it "
                    "changes nothing (got train.learning_rate too small, or every step skipped?). Raise "
                    "train.learning_rate or train.steps, then rerun.")
        if not self.measurable:
            return (f"train: the LoRA barely changes the model (got held-out loss change {self.heldout_change:+.1e}, "
                    f"largest ‖ΔW‖/‖W‖ {self.delta:.1e}). Raise train.learning_rate or train.steps, then rerun.")
        return None

    def metrics(self) -> dict:
        return {"lora_delta": self.delta, "heldout_change": self.heldout_change,
                "lora_effect": "measurable" if self.measurable else "none"}


def measure(transformer: torch.nn.Module, heldout_before: float, heldout_after: float) -> Effect:
    """The effect of the adapter now on `transformer` (a peft-adapted SD3 transformer)."""
    change = (heldout_after - heldout_before) / heldout_before if heldout_before else 0.0
    return Effect(delta=largest_relative_delta(transformer), heldout_change=change)


@torch.no_grad()
def largest_relative_delta(transformer: torch.nn.Module) -> float:
    """max over adapted Linears of ‖scale · B @ A‖ / ‖W‖ (Frobenius norms, fp32)."""
    largest = 0.0
    for module in transformer.modules():
        if not hasattr(module, "lora_B") or "default" not in module.lora_B:
            continue
        down, up = module.lora_A["default"].weight.float(), module.lora_B["default"].weight.float()
        delta = module.scaling["default"] * torch.linalg.matrix_norm(up @ down)
        weight = module.base_layer.weight
        weight = weight.dequantize() if hasattr(weight, "dequantize") else weight  # an int8 base (quanto)
        largest = max(largest, float(delta / torch.linalg.matrix_norm(weight.float())))
    return largest
