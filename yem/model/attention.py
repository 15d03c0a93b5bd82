"""Which attention the SD3 transformer runs (train.attention, render.attention), and the processor that chunks it.

- `use`: install the choice on a transformer (yem.model.chunked.resolve: auto is chunked on MPS only). Chunked
  attention's chunks come from the memory budget and keep every tensor under MPSGraph's 2³¹ elements whatever
  batch arrives.
- `ChunkedJointAttnProcessor`: diffusers' `JointAttnProcessor2_0` (SD3 and SD3.5 joint attention, and SD3.5's
  image-only `attn2`, which uses the same class) whose SDPA call runs `chunked_attention` instead. diffusers' own
  code runs unchanged: projections, qk-norm, the joint concatenation, the split, peft's LoRA layers; only the
  attention function is swapped, inside the call and on this thread (a torch function mode), so no other code
  sees it. Gradient checkpointing re-enters the processor in backward, and the swap with it.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0
from torch.overrides import TorchFunctionMode

from yem.model import chunked
from yem.model.chunked import CHUNK_BUDGET_MAX, MAX_ELEMENTS, chunk_for_budget, chunked_attention


def use(transformer: torch.nn.Module, setting: str, backend: str, memory_budget: int | None) -> chunked.Kind:
    """Make `transformer` (an SD3Transformer2DModel) run the attention `setting` resolves to; returns which."""
    kind = chunked.resolve(setting, backend)
    processor = ChunkedJointAttnProcessor(chunked.chunk_budget(memory_budget)) if kind == "chunked" else \
        JointAttnProcessor2_0()
    transformer.set_attn_processor(processor)
    return kind


def largest_sdpa_batch(kind: chunked.Kind, backend: str, heads: int, tokens: int) -> int | None:
    """The largest batch whose (B, H, T, T) score tensor MPSGraph can hold, where SDPA materialises it (None:
    no such limit). Chunked attention sizes its chunks to the batch instead."""
    if kind == "chunked" or backend not in chunked.KEEPS_SCORES:
        return None
    return max(1, MAX_ELEMENTS // (heads * tokens * tokens))


class _SwapSDPA(TorchFunctionMode):
    """Inside it a plain `F.scaled_dot_product_attention(q, k, v)` (no mask, no dropout, not causal, default scale)
    runs `attention(q, k, v, chunk_of(q, k))`; every other call and every other torch function passes untouched.
    Torch function modes are per thread and end with the block, exceptions included."""

    def __init__(self, attention: Callable, chunk_of: Callable[[torch.Tensor, torch.Tensor], int]):
        super().__init__()
        self.attention, self.chunk_of = attention, chunk_of

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and (bound := _plain_call(args, kwargs)) is not None:
            q, k, v = bound
            return self.attention(q, k, v, self.chunk_of(q, k))
        return func(*args, **kwargs)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _plain_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """q, k, v of an SDPA call that chunked attention computes: 4-d tensors, every option at its default (the stock
    joint processor passes dropout_p=0.0, is_causal=False). None for any other call."""
    bound = dict(zip(_SDPA_ARGS, args)) | kwargs
    if len(args) > len(_SDPA_ARGS) or not set(bound) <= set(_SDPA_ARGS):
        return None
    if bound.get("attn_mask") is not None or bound.get("scale") is not None or bound.get("dropout_p", 0.0) != 0.0 \
            or bound.get("is_causal") or bound.get("enable_gqa"):
        return None
    q, k, v = (bound.get(name) for name in _SDPA_ARGS[:3])
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return None
    return q, k, v


class ChunkedJointAttnProcessor(JointAttnProcessor2_0):
    """diffusers' SD3 joint attention processor with `chunked_attention` in place of SDPA.

        transformer.set_attn_processor(ChunkedJointAttnProcessor(budget_bytes=1 << 30))

    `budget_bytes`: each call's chunk-dependent working set (yem.model.chunked.chunk_bytes), from which the chunk
    is worked out per call shape; `chunk`: a fixed number of query rows instead (tests)."""

    def __init__(self, budget_bytes: int = CHUNK_BUDGET_MAX, chunk: int | None = None,
                 attention: Callable = chunked_attention):
        super().__init__()
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be at least 1 (got {chunk})")
        self.budget_bytes, self.chunk, self.attention = budget_bytes, chunk, attention

    def chunk_of(self, q: torch.Tensor, k: torch.Tensor) -> int:
        if self.chunk is not None:
            return self.chunk
        batch, heads, q_len, head_dim = q.shape
        return chunk_for_budget(batch, heads, q_len, k.shape[-2], head_dim, self.budget_bytes)

    # The stock __call__'s signature: diffusers' Attention.forward passes only the keyword arguments it names.
    def __call__(self, attn, hidden_states: torch.FloatTensor, encoder_hidden_states: torch.FloatTensor = None,
                 attention_mask: torch.FloatTensor | None = None, *args, **kwargs) -> torch.FloatTensor:
        with _SwapSDPA(self.attention, self.chunk_of):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
