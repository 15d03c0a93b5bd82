"""Memory readings per backend: the only module that asks torch.cuda / torch.mps / psutil about memory."""

import psutil

GIB = 1024**3


def used_bytes(backend: str) -> int:
    """Memory this process holds on its device now (CPU: resident set size)."""
    import torch

    if backend == "cuda":
        return torch.cuda.memory_allocated()
    if backend == "mps":
        return torch.mps.driver_allocated_memory()  # includes the allocator cache and MPSGraph internals
    return psutil.Process().memory_info().rss


def peak_bytes(backend: str) -> int:
    """Peak device memory since the last reset (CPU and MPS have no peak counter: the current value)."""
    import torch

    if backend == "cuda":
        return torch.cuda.max_memory_allocated()
    return used_bytes(backend)


def reset_peak(backend: str) -> None:
    import torch

    if backend == "cuda":
        torch.cuda.reset_peak_memory_stats()


def total_bytes(backend: str) -> int:
    """The device's memory: the GPU's on CUDA; RAM on the CPU and on Apple Silicon (unified memory)."""
    import torch

    if backend == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    return psutil.virtual_memory().total
