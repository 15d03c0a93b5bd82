"""The benchmarks measure what they say: a forced attention backend is the one that runs (issue 14: `--sdpa` once
entered a context nobody kept, so it changed nothing), and the Mac path leaves autocast off."""

import gc
import importlib.util

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.conftest import REPO

CPU_FLASH = "ScaledDotProductFlashAttentionForCpuBackward0"  # torch's default SDPA on the CPU
MATH = "UnsafeViewBackward0"  # the math composite's last op (bmm of the probabilities and v, then a view)


def train_step():
    spec = importlib.util.spec_from_file_location("train_step", REPO / "benchmarks" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def backward_node() -> str:
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    return F.scaled_dot_product_attention(q, q, q).grad_fn.name()


def test_a_forced_attention_backend_is_the_one_that_runs():
    bench = train_step()
    assert backward_node() == CPU_FLASH
    with bench.forced_attention(["math"]):
        gc.collect()  # the context is kept: collecting garbage changes nothing
        assert backward_node() == MATH
    with bench.forced_attention(["flash"], mps_path=True):  # a Mac has only the math composite
        assert backward_node() == MATH
    assert backward_node() == CPU_FLASH
    # the defect the benchmark had: entered on a temporary, the context is collected and the old backends return
    sdpa_kernel([SDPBackend.MATH], set_priority=True).__enter__()
    gc.collect()
    assert backward_node() == CPU_FLASH


def test_the_mac_path_runs_without_autocast_and_restores_it():
    from yem.hardware import device

    bench = train_step()
    original = device.autocast
    with bench.without_autocast():
        with device.autocast("cuda", torch.bfloat16) as context:
            assert context is None  # a nullcontext: peft's LoRA path computes in fp32 as on MPS
    assert device.autocast is original
