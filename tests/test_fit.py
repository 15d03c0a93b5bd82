"""Will it fit: the smallest params change that fits a budget, and the train stage refusing, before any weights
load, a run that cannot fit."""

import dataclasses

import pytest

from tests.test_estimate import SD3_MEDIUM, SD35_LARGE, work
from tests.test_memory import MAC_16
from yem.errors import HardwareError
from yem.hardware import apple
from yem.hardware.budget import memory_budget
from yem.hardware.memory import GIB
from yem.model import chunked
from yem.training import fit


def test_a_16gb_mac_at_1024px_is_told_to_chunk_attention_before_anything_loads():
    budget = memory_budget(MAC_16).bytes
    # torch's SDPA on MPS: 11 GiB with checkpointing (issue 14); the chunks sized as for this budget
    math_path = work(checkpointing=True, rank=16, chunk_budget=chunked.chunk_budget(budget))
    with pytest.raises(HardwareError) as error:
        fit.check_training(SD3_MEDIUM, math_path, budget)
    message = str(error.value)
    assert message.startswith("train: SD3-medium at 1024 px needs about 11.1 GiB, over the 9.6 GiB memory budget "
                              "(got batch 1, gradient checkpointing on, sdpa attention).")
    assert "Set train.attention: auto (then about 5.8 GiB)" in message and message.endswith("every stage.")
    fit.check_training(SD3_MEDIUM, dataclasses.replace(math_path, attention="chunked"), budget)  # fits: no error


def test_when_no_setting_is_enough_the_resolution_is_named():
    with pytest.raises(HardwareError, match=r"Even with train.attention: auto and train.quantize_base: int8 it needs "
                                            r".*lower data.resolution to 512 \(then about"):
        fit.check_training(SD35_LARGE, work(checkpointing=True), 9 * GIB)


def test_the_fewest_changes_are_chosen_and_auto_checkpointing_is_resolved():
    eight = memory_budget(apple.mac_readings(8)).bytes
    found = {px: fit.smallest_change(SD3_MEDIUM, work(resolution=px, render_resolution=px, attention="chunked",
                                                      render_attention="chunked",
                                                      chunk_budget=chunked.chunk_budget(eight)), eight)
             for px in (512, 768)}
    assert all(f.fits and f.settings == ("train.quantize_base: int8", "encode.use_t5: false") for f in found.values())
    # auto checkpointing as training decides it: on, since batch 1 does not fit an 8 GB Mac without it (measured
    # on the H200: 4.59 GiB at 512 px, over 90 % of the 4.8 GiB budget; 2.70 GiB with it)
    assert all(f.work.checkpointing for f in found.values())
    roomy = fit.smallest_change(SD3_MEDIUM, work(resolution=512, attention="chunked"), 64 * GIB)
    assert roomy.fits and roomy.settings == () and not roomy.work.checkpointing
    hopeless = fit.smallest_change(SD35_LARGE, work(), eight)
    assert not hopeless.fits and hopeless.needs["render"] > eight


def test_the_train_stage_refuses_before_loading_the_transformer(cached_project, monkeypatch):
    from yem.model import sd3
    from yem.params import ThermalParams
    from yem.training import setup

    root, params, hardware = cached_project

    def never(*args, **kwargs):
        raise AssertionError("the transformer was loaded")

    monkeypatch.setattr(sd3, "load_transformer", never)
    tiny_budget = dataclasses.replace(hardware, memory_budget_gib=0.001)
    with pytest.raises(HardwareError, match=r"^train: tiny SD3 at 64 px needs about .* memory budget"):
        setup.prepare(params.model, params.train, tiny_budget, root / "latents", root / "embeds", root,
                      ThermalParams(policy="ignore", max_pause_s=0), setup.Startup())


def test_t5_runs_on_the_device_where_it_fits_else_on_the_cpu_with_a_warning_else_not_at_all():
    import torch

    from yem.data.text import placement

    t5 = dataclasses.replace(work(), t5_tokens=77)
    sixteen, eight = memory_budget(MAC_16).bytes, memory_budget(apple.mac_readings(8)).bytes
    on_16 = placement(SD3_MEDIUM, "t5", t5, torch.float16, sixteen, cpu_budget=12 * GIB)
    assert (on_16.device, on_16.dtype, on_16.note) == ("mps", torch.float16, None)  # 9.0 of 9.6 GiB
    moved = placement(SD3_MEDIUM, "t5", t5, torch.float16, eight, cpu_budget=12 * GIB)
    assert (moved.device, moved.dtype) == ("cpu", torch.bfloat16)
    assert moved.note.startswith("T5-XXL needs about 9.0 GiB, over the 4.8 GiB mps budget: it runs on the CPU")
    with pytest.raises(HardwareError, match=r"^encode.use_t5: T5-XXL needs about 9.0 GiB, over the 4.8 GiB "
                                            r"memory budget, and about .* on the CPU, over the 6.0 GiB it may use "
                                            r"\(got true\)"):
        placement(SD3_MEDIUM, "t5", t5, torch.float16, eight, cpu_budget=6 * GIB)  # an 8 GB Mac: RAM less the OS
    assert placement(SD3_MEDIUM, "clip_g", t5, torch.float16, eight, cpu_budget=6 * GIB).device == "mps"
