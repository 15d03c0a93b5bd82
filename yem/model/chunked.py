"""Attention that does not need O(T²) memory (queries in chunks, each chunk's scores recomputed in backward), when
to use it and how big its chunks are.

Where torch has no fused attention kernel (MPS), `F.scaled_dot_product_attention` runs the math composite: it
upcasts half inputs to fp32, forms the (T × T) scores and softmax, and keeps the fp32 probabilities for backward,
B·H·T²·4 bytes per attention (1.6 GiB for SD3-medium at 1024 px, batch 1). Here (Rabe & Staats 2021,
"Self-attention does not need O(n²) memory"; the backward is flash attention's, Dao et al. 2022):

  forward   per chunk of c queries: S = (q·scale) Kᵀ, m = rowmax S, P̃ = exp(S − m), l = rowsum P̃,
            O = (P̃ V) / l, lse = m + log l; autograd keeps q, k, v, O and lse: O(T), no score matrix
  backward  per chunk: P = exp(S − lse) recomputed, dVᵀ += dOᵀ P, dP = dO Vᵀ, dS = P ∘ (dP − Δ) with
            Δ = rowsum(dO ∘ O), dQ = dS K · scale, dKᵀ += (q·scale)ᵀ dS; dK and dV accumulate in fp32

Everything from the scores on is fp32 whatever the input dtype, rounded to it once at the end, as the math
composite does: swapping one for the other changes memory, not numerics. The (c × T) matrices are only used in
their natural layout (the transposed products take the small side transposed), and every score-sized tensor
holds B·H·c·T elements, which `chunk_for_budget` keeps under MPSGraph's 2³¹ limit.
"""

import contextlib
import math
from typing import Literal

import torch
from torch.autograd.function import once_differentiable

from yem.hardware.memory import GIB, MIB

Kind = Literal["sdpa", "chunked"]
KEEPS_SCORES = {"mps"}  # backends whose SDPA is the math composite: the (T × T) scores are materialised and kept
# MPSGraph fails on a tensor of 2³¹ elements or more (one 5 × 24 × 4250² score tensor: SD3 at 1024 px, batch 5);
# the failure is not an out-of-memory error, so no back-off would catch it.
MAX_ELEMENTS = 2**31 - 1
# fp32 (c × T) buffers alive at once: backward holds P and dP (dS is computed in dP's place), forward one; the third
# is margin for MPSGraph's temporaries in the in-place ops, which torch's allocator does not see.
SCORE_BUFFERS = 3
# One attention call's chunk-dependent working set, as a share of the memory budget: 0.96 GiB on a 16 GB Mac
# (9.6 GiB budget; SD3-medium at 1024 px then runs 6 chunks of 709 queries), 0.48 GiB on an 8 GB one.
CHUNK_SHARE = 0.1
CHUNK_BUDGET_MIN, CHUNK_BUDGET_MAX = 128 * MIB, 2 * GIB  # below ~64 rows per chunk launches start to cost


def resolve(setting: str, backend: str) -> Kind:
    """train.attention / render.attention on this backend: auto is chunked where SDPA keeps the scores (MPS); on
    CUDA and the CPU torch's flash and memory-efficient kernels need O(T) memory already."""
    if setting == "auto":
        return "chunked" if backend in KEEPS_SCORES else "sdpa"
    return setting  # type: ignore[return-value]


def chunk_budget(memory_budget: int | None) -> int:
    """Bytes one attention call's chunks may take: CHUNK_SHARE of the memory budget, clamped."""
    if memory_budget is None:
        return CHUNK_BUDGET_MAX
    return int(min(CHUNK_BUDGET_MAX, max(CHUNK_BUDGET_MIN, CHUNK_SHARE * memory_budget)))


def chunk_bytes(batch: int, heads: int, kv_len: int, head_dim: int, chunk: int,
                score_buffers: int = SCORE_BUFFERS) -> int:
    """The transient bytes that grow with the chunk: `score_buffers` fp32 (c × Tk) matrices over batch and heads,
    and the chunk's fp32 slices of q, dQ, dO and O with their row sums."""
    return batch * heads * chunk * (score_buffers * kv_len + 6 * head_dim + 2) * 4


def fixed_bytes(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, itemsize: int,
                backward: bool = True) -> int:
    """The transient bytes no chunk size changes, O(T): fp32 copies of k and v and their transposes, the fp32 dKᵀ
    and dVᵀ accumulators, and dQ, dK, dV in the input dtype; without `backward` (rendering) the fp32 kᵀ and v and
    the output."""
    if not backward:
        return batch * heads * (kv_len * 2 * head_dim * 4 + q_len * head_dim * itemsize)
    return batch * heads * (kv_len * 6 * head_dim * 4 + (q_len + 2 * kv_len) * head_dim * itemsize)


def kept_bytes(batch: int, heads: int, tokens: int, head_dim: int) -> int:
    """What autograd keeps between forward and backward beyond q, k and v: the fp32 output and logsumexp."""
    return batch * heads * tokens * (head_dim + 1) * 4


def chunk_for_budget(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, budget_bytes: int,
                     max_elements: int = MAX_ELEMENTS) -> int:
    """Query rows per chunk: the most whose score-sized tensors stay within `max_elements` and whose `chunk_bytes`
    fit `budget_bytes`, evened out over the chunks that many rows need (4250 queries allowed 4000 rows run as two
    chunks of 2125: as many steps, a smaller peak, at most two shapes for MPSGraph to compile). q_len when the
    whole call fits; 1 when not even one row fits the budget. The O(T) `fixed_bytes` are not traded against the
    budget: no chunk size changes them, and counting them would only drive the chunk to one row."""
    if min(batch, heads, q_len, kv_len, head_dim) < 1:
        raise ValueError(f"attention sizes must be positive (got B={batch} H={heads} T={q_len}/{kv_len} "
                         f"D={head_dim})")
    row = batch * heads * kv_len  # elements of one query row's scores, over the batch and heads
    if row > max_elements:
        raise ValueError(f"one query row of scores is {row} elements, over the {max_elements} element limit")
    per_row = chunk_bytes(batch, heads, kv_len, head_dim, 1)
    largest = max(1, min(q_len, max_elements // row, budget_bytes // per_row))
    chunks = -(-q_len // largest)
    return -(-q_len // chunks)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
    """softmax(q kᵀ / √D) v for (B, H, T, D) tensors, `chunk` query rows at a time: what
    `F.scaled_dot_product_attention(q, k, v)` computes with no mask, no dropout and the default scale. With autograd
    recording it keeps O(T) for backward; otherwise nothing."""
    _check(q, k, v, chunk)
    with _no_autocast(q):  # fp32 scores by design, also under CUDA's autocast
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _ChunkedAttention.apply(q, k, v, chunk)
        return _forward(q, k, v, chunk, keep=False)[0]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected (B, H, T, D) tensors (got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)})")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"mismatched shapes (got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)})")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k and v must share one floating dtype (got {q.dtype}, {k.dtype}, {v.dtype})")
    if int(chunk) < 1:
        raise ValueError(f"chunk must be at least 1 (got {chunk})")


def _no_autocast(x: torch.Tensor):
    kind = x.device.type
    return torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else contextlib.nullcontext()


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) → (B·H, T, D): a view where the layout allows, else one O(T) copy."""
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _forward(q, k, v, chunk: int, keep: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The output (B, H, Tq, Dv) in the input dtype; with `keep`, also the output in fp32 (B·H, Tq, Dv; the same
    tensor for fp32 inputs) and each row's logsumexp (B·H, Tq) in fp32, which backward needs."""
    batch, heads, q_len, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim)
    qf, kt, vf = _flat(q), _fp32(_flat(k)).transpose(1, 2).contiguous(), _fp32(_flat(v))
    out = q.new_empty(qf.shape[0], q_len, v.shape[-1])
    out32 = out if q.dtype == torch.float32 or not keep else out.new_empty(out.shape, dtype=torch.float32)
    lse = qf.new_empty(qf.shape[0], q_len, dtype=torch.float32) if keep else None
    for start in range(0, q_len, chunk):
        stop = min(start + chunk, q_len)
        scores = torch.bmm(_fp32(qf[:, start:stop]) * scale, kt)  # (BH, c, Tk) fp32: the score-sized buffer
        peak = scores.amax(dim=-1, keepdim=True)
        scores.sub_(peak).exp_()
        total = scores.sum(dim=-1, keepdim=True)
        out32[:, start:stop] = torch.bmm(scores, vf).div_(total)  # normalise the (c × Dv) result, not the scores
        del scores
        if lse is not None:
            lse[:, start:stop] = (total.log_() + peak).squeeze(-1)
    if out32 is not out:
        out.copy_(out32)
    return out.view(batch, heads, q_len, -1), (out32 if keep else None), lse


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, chunk):
        out, out32, lse = _forward(q, k, v, chunk, keep=True)
        # O in fp32 for half inputs (O(T)): Δ from the rounded O doubled dQ's and dK's error in bf16 against the
        # math composite's, which forms Δ from fp32 values
        ctx.save_for_backward(q, k, v, out32, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out32, lse = ctx.saved_tensors
        with _no_autocast(q):
            return (*_backward(q, k, v, out32, lse, grad_out, ctx.chunk, ctx.needs_input_grad[:3]), None)


def _backward(q, k, v, out32, lse, grad_out, chunk: int, needs: tuple[bool, ...]):
    batch, heads, q_len, head_dim = q.shape
    kv_len, value_dim = k.shape[-2], v.shape[-1]
    scale = 1.0 / math.sqrt(head_dim)
    qf, gf = _flat(q), _flat(grad_out)
    kf, vf = _fp32(_flat(k)), _fp32(_flat(v))
    kt, vt = kf.transpose(1, 2).contiguous(), vf.transpose(1, 2).contiguous()
    rows = qf.shape[0]
    dq = q.new_empty(rows, q_len, head_dim) if needs[0] else None
    dkt = kf.new_zeros(rows, head_dim, kv_len, dtype=torch.float32) if needs[1] else None  # dKᵀ
    dvt = vf.new_zeros(rows, value_dim, kv_len, dtype=torch.float32) if needs[2] else None  # dVᵀ
    for start in range(0, q_len, chunk):
        stop = min(start + chunk, q_len)
        qc = _fp32(qf[:, start:stop]) * scale  # (BH, c, D)
        do = _fp32(gf[:, start:stop])  # (BH, c, Dv)
        delta = (do * out32[:, start:stop]).sum(dim=-1, keepdim=True)  # Δ = rowsum(dO ∘ O), (BH, c, 1)
        probs = torch.bmm(qc, kt)  # S, then P = exp(S − lse) in place
        probs.sub_(lse[:, start:stop].unsqueeze(-1)).exp_()
        if dvt is not None:
            dvt.baddbmm_(do.transpose(1, 2), probs)  # dVᵀ += dOᵀ P
        dscores = torch.bmm(do, vt)  # dP = dO Vᵀ, then dS = P ∘ (dP − Δ) in place
        dscores.sub_(delta).mul_(probs)
        del probs
        if dq is not None:
            dq[:, start:stop] = torch.bmm(dscores, kf).mul_(scale)  # dQ = dS K · scale
        if dkt is not None:
            dkt.baddbmm_(qc.transpose(1, 2), dscores)  # dKᵀ += (q · scale)ᵀ dS
        del dscores
    dq = None if dq is None else dq.view(batch, heads, q_len, head_dim)
    dk = None if dkt is None else dkt.transpose(1, 2).to(k.dtype).contiguous().view(batch, heads, kv_len, head_dim)
    dv = None if dvt is None else dvt.transpose(1, 2).to(v.dtype).contiguous().view(batch, heads, kv_len, value_dim)
    return dq, dk, dv
