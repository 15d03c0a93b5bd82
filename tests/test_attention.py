"""Chunked attention against torch's math SDPA (the path MPS takes), the chunk rule, and the processor in SD3.

Tolerances. Both sides compute in fp32 from the first matmul on and round to the input dtype once at the end; they
differ only in the order of fp32 sums. So in fp32 the difference is a few ulps of the largest value (FP32_TOL = 64
eps ≈ 7.6e-6 of max |ref|), and in half precision an fp32-level difference can at most flip the final rounding:
one ulp, ≤ eps(dtype) × max |ref|. Through a whole half-precision transformer that one ulp travels on through
half-precision layers, which HALF_MODEL_ULPS allows for.
"""

import copy
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tests.test_batching import AllocationLimit
from yem.model import attention, chunked
from yem.model.attention import ChunkedJointAttnProcessor
from yem.model.chunked import MAX_ELEMENTS, chunk_bytes, chunk_for_budget, chunked_attention, fixed_bytes

FP32_TOL = 64 * torch.finfo(torch.float32).eps
HALF = [torch.bfloat16, torch.float16]
HALF_MODEL_ULPS = 1  # each attention output's one rounding, carried through the half-precision layers (measured ≤ 0.2)


def math_sdpa(q, k, v):
    with sdpa_kernel(SDPBackend.MATH):  # torch's math composite, what MPS runs
        return F.scaled_dot_product_attention(q, k, v)


def make_qkv(shape_q, shape_kv=None, seed=0, dtype=torch.float32):
    """q, k, v and an output gradient; q and k scaled up so the softmax is peaked, not flat."""
    shape_kv = shape_kv or shape_q
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(shape_q, generator=gen) * 2, torch.randn(shape_kv, generator=gen) * 2
    v, grad = torch.randn(shape_kv, generator=gen), torch.randn(shape_q, generator=gen)
    return [t.to(dtype) for t in (q, k, v, grad)]


def run(fn, q, k, v, grad):
    """fn's output and dq, dk, dv for fresh leaf copies of q, k, v, as float64."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach().double()] + [t.grad.double() for t in leaves]


def relative(a, b):
    """max |a − b| relative to max |b| (absolute where b is all zeros)."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_close(got, want, tol, names=("out", "dq", "dk", "dv")):
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, name
        assert relative(a, b) <= tol, f"{name}: {relative(a, b):.2e} > {tol:.2e}"


CASES = [  # (B, H, Tq, Tk, D, chunk)
    (2, 3, 37, 37, 16, 8),  # T not divisible by the chunk
    (2, 3, 64, 64, 16, 16),  # divisible
    (1, 2, 37, 37, 16, 37),  # chunk == T
    (1, 2, 37, 37, 16, 500),  # chunk > T
    (1, 1, 5, 5, 8, 1),  # one row at a time
    (2, 2, 20, 33, 16, 6),  # Tq != Tk
]


@pytest.mark.parametrize("batch,heads,q_len,kv_len,dim,chunk", CASES)
def test_fp32_matches_math_sdpa(batch, heads, q_len, kv_len, dim, chunk):
    q, k, v, grad = make_qkv((batch, heads, q_len, dim), (batch, heads, kv_len, dim))
    want = run(math_sdpa, q, k, v, grad)
    assert_close(run(lambda *x: chunked_attention(*x, chunk), q, k, v, grad), want, FP32_TOL)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("chunk", [8, 37])
def test_half_matches_math_sdpa_and_is_as_accurate(dtype, chunk):
    q, k, v, grad = make_qkv((2, 3, 37, 16), dtype=dtype)
    want = run(math_sdpa, q, k, v, grad)
    got = run(lambda *x: chunked_attention(*x, chunk), q, k, v, grad)
    assert_close(got, want, torch.finfo(dtype).eps)  # at most one final rounding apart
    exact = run(math_sdpa, *(t.double() for t in (q, k, v, grad)))  # the same rounded inputs, in float64
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, want, exact):
        assert relative(a, c) <= 1.25 * relative(b, c) + 1e-6, name


@pytest.mark.parametrize("dtype", [torch.float32] + HALF, ids=str)
def test_results_keep_the_input_dtype_and_layout(dtype):
    # q, k, v as the processor makes them: (B, T, H, D) transposed to (B, H, T, D), not contiguous
    q, k, v = (torch.randn(2, 9, 3, 8, dtype=dtype).transpose(1, 2).requires_grad_() for _ in range(3))
    out = chunked_attention(q, k, v, 4)
    assert out.dtype == dtype and out.shape == (2, 3, 9, 8)
    out.backward(torch.ones_like(out))
    assert all(t.grad.dtype == dtype and t.grad.shape == t.shape for t in (q, k, v))


def test_without_grad_nothing_is_kept_and_only_needed_grads_are_made():
    q, k, v, grad = make_qkv((1, 2, 11, 8))
    with torch.no_grad():
        out = chunked_attention(q.requires_grad_(), k, v, 4)
    assert out.grad_fn is None and relative(out, math_sdpa(q, k, v)) <= FP32_TOL
    q.requires_grad_(False)
    v = v.clone().requires_grad_()
    chunked_attention(q, k, v, 4).backward(grad)
    reference = v.detach().clone().requires_grad_()
    math_sdpa(q, k, reference).backward(grad)
    assert relative(v.grad, reference.grad) <= FP32_TOL and q.grad is None and k.grad is None


def test_bad_arguments_are_refused():
    q = torch.randn(1, 2, 5, 8)
    for args in ((q, q, q, 0), (q[0], q[0], q[0], 2), (q, q.half(), q, 2)):
        with pytest.raises(ValueError):
            chunked_attention(*args)


def saved_bytes(fn, *inputs) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn(*inputs) runs."""
    kept = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*inputs)
    return sum(kept.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_keeps_o_of_t_where_math_keeps_the_scores(dtype):
    batch, heads, tokens, dim = 1, 4, 300, 16
    q, k, v = (torch.randn(batch, heads, tokens, dim, dtype=dtype, requires_grad=True) for _ in range(3))
    # q, k, v themselves, the fp32 output and the fp32 logsumexp
    assert saved_bytes(lambda *x: chunked_attention(*x, 64), q, k, v) == (
        3 * batch * heads * tokens * dim * dtype.itemsize + batch * heads * tokens * (dim + 1) * 4)
    assert saved_bytes(math_sdpa, q, k, v) > batch * heads * tokens**2 * 4  # the fp32 (T × T) probabilities


def test_the_transient_peak_is_what_the_chunk_rule_counts():
    """Forward + backward's counted peak sits between the two fp32 score buffers the CPU holds and the rule's
    count with two buffers (SCORE_BUFFERS adds a third for MPSGraph's temporaries, which no CPU count sees)."""
    batch, heads, tokens, dim, chunk = 1, 4, 512, 32, 128
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, grad = make_qkv((batch, heads, tokens, dim), dtype=dtype)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        with AllocationLimit(2**62) as live:
            chunked_attention(q, k, v, chunk).backward(grad)
        bound = (chunk_bytes(batch, heads, tokens, dim, chunk, score_buffers=2)
                 + fixed_bytes(batch, heads, tokens, tokens, dim, dtype.itemsize))
        assert 2 * batch * heads * chunk * tokens * 4 < live.peak <= bound, (live.peak, bound)


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.dtypes = set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        self.dtypes.update(t.dtype for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor))
        return out


MPS_NATIVE = {  # every aten op chunked attention dispatches; each has an MPS kernel (native_functions.yaml)
    "aten.bmm.default", "aten.baddbmm_.default", "aten.mul.Tensor", "aten.mul_.Tensor", "aten.sub_.Tensor",
    "aten.exp_.default", "aten.amax.default", "aten.sum.dim_IntList", "aten.div_.Tensor", "aten.log_.default",
    "aten.add.Tensor", "aten.copy_.default", "aten._to_copy.default", "aten.clone.default",
    "aten.new_empty.default", "aten.new_empty_strided.default", "aten.new_zeros.default", "aten.view.default",
    "aten.detach.default", "aten.slice.Tensor", "aten.transpose.int", "aten.unsqueeze.default", "aten.squeeze.dim",
}


@pytest.mark.parametrize("dtype", [torch.float32] + HALF, ids=str)
def test_only_mps_native_ops_and_no_float64(dtype):
    q, k, v, grad = make_qkv((1, 2, 10, 8), dtype=dtype)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # the processor's non-contiguous layout
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with OpLog() as log:
        chunked_attention(q, k, v, 3).backward(grad)
        with torch.no_grad():
            chunked_attention(q, k, v, 3)
    assert log.ops <= MPS_NATIVE, log.ops - MPS_NATIVE
    assert log.dtypes <= {dtype, torch.float32}, log.dtypes


@pytest.mark.parametrize("seed", range(12))
def test_chunk_rule_against_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, heads, tokens = (int(torch.randint(1, hi, (), generator=gen)) for hi in (4, 6, 300))
    dim = int(torch.randint(1, 65, (), generator=gen))
    budget = int(chunk_bytes(batch, heads, tokens, dim, tokens) * float(torch.rand((), generator=gen)) * 1.2)
    limit = int(batch * heads * tokens**2 * float(torch.rand((), generator=gen)) * 1.2) + batch * heads * tokens
    chunk = chunk_for_budget(batch, heads, tokens, tokens, dim, budget, max_elements=limit)
    fitting = [c for c in range(1, tokens + 1)
               if batch * heads * c * tokens <= limit and chunk_bytes(batch, heads, tokens, dim, c) <= budget]
    assert 1 <= chunk <= tokens and batch * heads * chunk * tokens <= limit
    if not fitting:
        assert chunk == 1  # not one row fits the budget: the smallest working set there is
    else:
        assert chunk_bytes(batch, heads, tokens, dim, chunk) <= budget
        assert math.ceil(tokens / chunk) == math.ceil(tokens / max(fitting))  # as few chunks as possible
        assert chunk == math.ceil(tokens / math.ceil(tokens / max(fitting)))  # evened out


def test_chunk_rule_on_sd3_shapes():
    # 5 × 24 × 4250² = 2.2e9 scores: one tensor fails on MPSGraph; two chunks of 2125 rows do not
    assert chunk_for_budget(5, 24, 4250, 4250, 64, budget_bytes=2**50) == 2125
    assert chunk_for_budget(1, 24, 4250, 4250, 64, budget_bytes=2**50) == 4250  # 4.3e8: whole
    # a 16 GB Mac's chunk budget (0.96 GiB): SD3-medium at 1024 px runs 6 chunks of 709 queries
    assert chunk_for_budget(1, 24, 4250, 4250, 64, chunked.chunk_budget(int(9.6 * 2**30))) == 709
    budgets = [chunk_for_budget(2, 24, 4250, 4250, 64, b << 20) for b in (64, 256, 1024, 65536)]
    assert budgets == sorted(budgets) and chunk_for_budget(2, 24, 4250, 4250, 64, 1) == 1
    with pytest.raises(ValueError):
        chunk_for_budget(2**20, 2**10, 4, 4, 8, 2**40)  # one row alone is 2³² elements


def test_auto_is_chunked_on_mps_only_and_the_chunk_budget_follows_the_memory_budget():
    assert chunked.resolve("auto", "mps") == "chunked"
    assert chunked.resolve("auto", "cuda") == chunked.resolve("auto", "cpu") == "sdpa"
    assert chunked.resolve("chunked", "cpu") == "chunked" and chunked.resolve("sdpa", "mps") == "sdpa"
    small, large = chunked.chunk_budget(int(4.8 * 2**30)), chunked.chunk_budget(int(86.4 * 2**30))
    assert chunked.CHUNK_BUDGET_MIN < small < large == chunked.CHUNK_BUDGET_MAX
    # where SDPA materialises the scores, the batch that MPSGraph can hold (issue 14: batch 5 at 1024 px fails)
    assert attention.largest_sdpa_batch("sdpa", "mps", 24, 4250) == 4
    assert attention.largest_sdpa_batch("chunked", "mps", 24, 4250) is None
    assert attention.largest_sdpa_batch("sdpa", "cuda", 24, 4250) is None


# ---------------------------------------------------------------------------------------------------------------
# the processor in SD3 and SD3.5 transformers


def tiny_sd3(sd35: bool, dtype=torch.float32):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    extra = dict(qk_norm="rms_norm", dual_attention_layers=(0,)) if sd35 else {}
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                 attention_head_dim=64, num_attention_heads=2, caption_projection_dim=128,
                                 joint_attention_dim=128, pooled_projection_dim=96, pos_embed_max_size=64,
                                 **extra).to(dtype)


class Counting:
    """chunked_attention, counting its calls and the shapes it saw."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, chunk):
        self.calls.append((tuple(q.shape), chunk))
        return chunked_attention(q, k, v, chunk)


def forward_backward(model, dtype):
    gen = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 16, 16, 16, generator=gen).to(dtype),
                  encoder_hidden_states=torch.randn(2, 10, 128, generator=gen).to(dtype),
                  pooled_projections=torch.randn(2, 96, generator=gen).to(dtype), timestep=torch.tensor([500.0, 20.0]))
    out = model(**inputs, return_dict=False)[0]
    (out.float() * torch.randn(out.shape, generator=gen)).sum().backward()
    grads = {name: p.grad.detach().double() for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora" in name for name in grads)
    return out.detach().double(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sd35", [False, True], ids=["sd3", "sd35"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_tiny_transformer_with_lora_matches_math_sdpa(dtype, sd35, checkpointing):
    from peft import LoraConfig

    stock = tiny_sd3(sd35, dtype).requires_grad_(False)
    # random A and B: the LoRA path changes the output and its gradients are not trivial
    stock.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    chunked, counting = copy.deepcopy(stock), Counting()
    chunked.set_attn_processor(ChunkedJointAttnProcessor(chunk=7, attention=counting))  # 64 + 10 tokens: 11 chunks
    attentions = len(chunked.attn_processors)
    assert attentions == (3 if sd35 else 2)  # SD3.5's block 0 has the joint attn and the image-only attn2
    for model in (stock, chunked):
        model.train()
        if checkpointing:
            model.enable_gradient_checkpointing()
    with sdpa_kernel(SDPBackend.MATH):
        want_out, want_grads = forward_backward(stock, dtype)
    got_out, got_grads = forward_backward(chunked, dtype)
    # every attention ran chunked, and once more in backward's recomputation under checkpointing
    assert len(counting.calls) == attentions * (2 if checkpointing else 1)
    assert sorted({shape[2] for shape, _ in counting.calls}) == ([64, 74] if sd35 else [74])
    tol = FP32_TOL if dtype == torch.float32 else HALF_MODEL_ULPS * torch.finfo(dtype).eps
    assert relative(got_out, want_out) <= tol and got_grads.keys() == want_grads.keys()
    for name in want_grads:
        assert relative(got_grads[name], want_grads[name]) <= tol, name


def test_rendering_without_grad_matches_and_installing_swaps_every_processor():
    stock = tiny_sd3(sd35=True)
    chunked = copy.deepcopy(stock)
    assert attention.use(chunked, "auto", "mps", 8 * 2**30) == "chunked"
    assert all(isinstance(p, ChunkedJointAttnProcessor) for p in chunked.attn_processors.values())
    gen = torch.Generator().manual_seed(2)
    inputs = dict(hidden_states=torch.randn(2, 16, 16, 16, generator=gen), timestep=torch.tensor([3.0, 900.0]),
                  encoder_hidden_states=torch.randn(2, 10, 128, generator=gen), pooled_projections=torch.randn(2, 96))
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.MATH):
            want = stock(**inputs, return_dict=False)[0]
        got = chunked(**inputs, return_dict=False)[0]
    assert relative(got, want) <= FP32_TOL
    assert attention.use(chunked, "auto", "cpu", 8 * 2**30) == "sdpa"
    assert not any(isinstance(p, ChunkedJointAttnProcessor) for p in chunked.attn_processors.values())


def test_the_processor_keeps_the_stock_signature_and_leaves_other_sdpa_calls_alone():
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    assert isinstance(ChunkedJointAttnProcessor(), JointAttnProcessor2_0)
    # diffusers' Attention.forward passes only the keyword arguments named in the processor's signature
    assert (list(inspect.signature(ChunkedJointAttnProcessor.__call__).parameters)
            == list(inspect.signature(JointAttnProcessor2_0.__call__).parameters))
    counting = Counting()
    q, k, v, _ = make_qkv((1, 2, 6, 8))
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    with attention._SwapSDPA(counting, lambda q, k: 2):
        others = [F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                  F.scaled_dot_product_attention(q, k, v, is_causal=True), F.scaled_dot_product_attention(q, k, v,
                                                                                                          scale=0.3)]
        plain = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    assert len(counting.calls) == 1 and relative(plain, math_sdpa(q, k, v)) <= FP32_TOL
    torch.testing.assert_close(others[0], F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    F.scaled_dot_product_attention(q, k, v)  # outside the block SDPA is torch's again
    assert len(counting.calls) == 1


def test_a_full_size_sd3_medium_joint_attention_matches_math_sdpa(dtype=torch.float32):
    """One SD3-medium block's joint attention at 1024 px: 1536 wide, 24 heads, 4096 image + 154 text tokens, with
    a short last chunk (4250 = 4 × 1024 + 154); outputs, input gradients and projection weight gradients. In fp32:
    half precision costs the CPU twice the time here and is compared on the tiny transformers above."""
    from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

    torch.manual_seed(0)
    dim, heads = 1536, 24
    attn = Attention(query_dim=dim, added_kv_proj_dim=dim, dim_head=dim // heads, heads=heads, out_dim=dim,
                     context_pre_only=False, bias=True, processor=JointAttnProcessor2_0()).to(dtype)
    attn.requires_grad_(False)
    trained = (attn.to_q.weight, attn.to_out[0].weight, attn.add_k_proj.weight)
    for weight in trained:
        weight.requires_grad_(True)
    gen = torch.Generator().manual_seed(1)
    image, text, *grads = (torch.randn(1, n, dim, generator=gen).to(dtype) for n in (4096, 154, 4096, 154))

    def step(processor):
        attn.set_processor(processor)
        attn.zero_grad(set_to_none=True)
        x, c = image.clone().requires_grad_(), text.clone().requires_grad_()
        outputs = attn(x, encoder_hidden_states=c)
        torch.autograd.backward(outputs, grads)
        return [t.detach().double() for t in (*outputs, x.grad, c.grad, *(w.grad for w in trained))]

    with sdpa_kernel(SDPBackend.MATH):
        want = step(JointAttnProcessor2_0())
    got = step(ChunkedJointAttnProcessor(chunk=1024))
    tol = FP32_TOL if dtype == torch.float32 else torch.finfo(dtype).eps
    assert_close(got, want, tol, names=("image out", "text out", "d image", "d text", "d to_q", "d to_out", "d add_k"))


@pytest.mark.parametrize("model", ["SD3-medium", "SD3.5-medium", "SD3.5-large"])
def test_no_tensor_reaches_two_to_the_31_elements_at_the_largest_planned_batch(model):
    """A whole transformer block, forward and backward, at 1024 px with the longest text yem allows (77 CLIP + 512
    T5 tokens) and the largest batch the planner reaches (MAX_AUTO_BATCH), on the meta device (shapes only, no
    memory): with chunked attention every tensor stays under MPSGraph's 2³¹ elements, with math SDPA it does not."""
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from yem.model.architecture import KNOWN_MODELS
    from yem.training.batching import MAX_AUTO_BATCH

    arch = next(a for a in KNOWN_MODELS.values() if a.name == model)
    batch, image, text = MAX_AUTO_BATCH, (1024 // 16) ** 2, 77 + 512
    with torch.device("meta"):
        block = JointTransformerBlock(dim=arch.width, num_attention_heads=arch.heads, attention_head_dim=64,
                                      context_pre_only=False, qk_norm="rms_norm" if arch.qk_norm else None,
                                      use_dual_attention=arch.dual_attention_layers > 0).to(torch.float16)
        inputs = [torch.empty(batch, n, arch.width, dtype=torch.float16, requires_grad=True) for n in (image, text)]
        temb = torch.empty(batch, arch.width, dtype=torch.float16)
    largest = {}
    for kind, processor in (("chunked", ChunkedJointAttnProcessor(chunked.CHUNK_BUDGET_MAX)),
                            ("math", JointAttnProcessor2_0())):
        for attn in filter(None, (block.attn, block.attn2)):
            attn.set_processor(processor)
        with Sizes() as sizes, sdpa_kernel(SDPBackend.MATH):
            text_out, image_out = block(inputs[0], inputs[1], temb)
            torch.autograd.backward([image_out, text_out], [torch.empty_like(image_out), torch.empty_like(text_out)])
        largest[kind] = sizes.largest
    assert largest["chunked"] <= MAX_ELEMENTS < largest["math"], largest


class Sizes(TorchDispatchMode):
    """The largest tensor any op makes, in elements."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.largest = max([self.largest] + [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)])
        return out
