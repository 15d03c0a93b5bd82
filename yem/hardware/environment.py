"""The process environment torch reads once, at import: set it before anything imports torch.

`configure_environment()` runs first in every stage process (the stages package and `yem doctor` call it before any
torch import). It turns on the MPS CPU fallback (unsupported ops run on the CPU, and yem.hardware.fallbacks lists
them), quiets the libraries' own progress output, and sets the MPS allocator's watermark pair (see
`mps_watermarks`).
"""

import os
import sys
from collections.abc import Mapping

MPS_HIGH_WATERMARK = "PYTORCH_MPS_HIGH_WATERMARK_RATIO"
MPS_LOW_WATERMARK = "PYTORCH_MPS_LOW_WATERMARK_RATIO"
# Both ratios multiply Metal's recommended working set. High is the hard limit (torch's default 1.7 exceeds the RAM
# of most Macs, so overcommit swaps instead of failing); yem's is its memory budget (budget.MPS_SHARE).
YEM_HIGH_WATERMARK = 0.9
# Low is the soft limit above which the allocator frees cached blocks; yem keeps torch's own 1.4 : 1.7 proportion.
LOW_PER_HIGH = 1.4 / 1.7
TORCH_LOW_WATERMARK, TORCH_MAX_WATERMARK = 1.4, 2.0  # torch's unified-memory default; the allowed maximum


def configure_environment(platform: str = sys.platform) -> None:
    """Set allocator and fallback variables; must run before torch is imported (torch reads them at import)."""
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")  # unsupported MPS ops run on the CPU, logged
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # yem shows one bar per phase instead
    if platform == "darwin":
        updates, note = mps_watermarks(os.environ)
        os.environ.update(updates)
        if note:
            print(f"note: {note}", file=sys.stderr)


def mps_watermarks(env: Mapping[str, str]) -> tuple[dict[str, str], str | None]:
    """The watermark variables to set so that torch accepts the pair, and a note when yours had to change.

    torch checks 0 <= high <= 2 and 0 <= low <= high (or <= 2 when high is 0, "unlimited") when the MPS allocator
    starts, and dies with "invalid low watermark ratio 1.4" when only a high ratio below 1.4 is set. So yem sets
    both or neither: its own pair when you set none, and a low ratio that fits under yours when you set only high.
    """
    high_text, low_text = env.get(MPS_HIGH_WATERMARK), env.get(MPS_LOW_WATERMARK)
    if high_text is None and low_text is None:
        return _yem_watermarks(), None
    if high_text is None:  # only low: yem's hard limit, raised where needed to stay above it
        low = _ratio(low_text)
        if low is None:
            return _yem_watermarks(), _not_a_ratio(MPS_LOW_WATERMARK, low_text)
        return {MPS_HIGH_WATERMARK: _text(max(YEM_HIGH_WATERMARK, low))}, None
    high = _ratio(high_text)
    if high is None:
        return _yem_watermarks(), _not_a_ratio(MPS_HIGH_WATERMARK, high_text)
    limit = high or TORCH_MAX_WATERMARK  # high 0: no hard limit
    low = TORCH_LOW_WATERMARK if low_text is None else _ratio(low_text)
    if low is not None and low <= limit:
        return {}, None
    fitted = {MPS_LOW_WATERMARK: _text(limit * LOW_PER_HIGH)}
    if low_text is None:  # the trap: torch's default low (1.4) above a high below 1.4
        return fitted, None
    return fitted, (f"{MPS_LOW_WATERMARK}: must not exceed {MPS_HIGH_WATERMARK} ({high_text}) (got {low_text!r}). "
                    f"yem uses {fitted[MPS_LOW_WATERMARK]}; fix or unset it.")


def user_high_watermark(env: Mapping[str, str]) -> bool:
    """Whether the MPS hard limit in the environment is someone else's choice rather than yem's."""
    return env.get(MPS_HIGH_WATERMARK, _text(YEM_HIGH_WATERMARK)) != _text(YEM_HIGH_WATERMARK)


def _yem_watermarks() -> dict[str, str]:
    return {MPS_HIGH_WATERMARK: _text(YEM_HIGH_WATERMARK), MPS_LOW_WATERMARK: _text(YEM_HIGH_WATERMARK * LOW_PER_HIGH)}


def _not_a_ratio(name: str, text: str) -> str:
    return f"{name}: not a ratio between 0 and 2 (got {text!r}). yem uses its own watermarks; unset it or give 0.9."


def _ratio(text: str) -> float | None:
    """A watermark ratio torch accepts (0 to 2), or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 <= value <= TORCH_MAX_WATERMARK else None


def _text(ratio: float) -> str:
    return f"{ratio:.3f}".rstrip("0").rstrip(".")
