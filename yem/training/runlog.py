"""The run log: how far a training run has got and what happened on the way.

One typed record the loop updates, a checkpoint saves (as JSON) and a resume or a rollback restores. The per-step
rows become metrics/train_steps.tsv; the rest goes into metrics/train.json.
"""

import dataclasses
from dataclasses import dataclass, field

from yem.hardware.thermal.governor import Totals


@dataclass
class RunLog:
    dtype: str  # the compute dtype of the base now ("bfloat16"); a rollback with on_nonfinite fp32 changes it
    step: int = 0  # optimizer updates done
    rows: list[dict] = field(default_factory=list)  # one per step: step, loss, lr, s_per_step, memory_gib, thermal
    nonfinite_steps: int = 0  # updates skipped because the loss or a gradient was NaN or Inf
    scaler_skipped_steps: int = 0  # fp16: updates skipped because the loss scale overflowed (then halved)
    bad_streak: int = 0  # of those in a row, as of the last read from the device
    rollbacks: list[dict] = field(default_factory=list)  # {at_step, to_step, remedy}
    lr_scale: float = 1.0  # learning-rate factor the rollbacks applied
    backoffs: list[dict] = field(default_factory=list)  # memory back-offs: {step, reason, plan}
    thermal: Totals = field(default_factory=Totals)  # the thermal governor's throttled time and pauses

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> "RunLog":
        return cls(**{**raw, "thermal": Totals(**raw["thermal"])})
