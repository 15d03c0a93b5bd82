"""Rendering fits the memory it has: several images per call where they fit, fewer and then a tiled VAE decode
after an out-of-memory error (simulated here with MPS's own message), and advice when nothing is left."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, cpu_hardware
from tests.test_export import make_lora
from yem.errors import HardwareError
from yem.model import footprint, lora_file
from yem.outputs import render
from yem.params import load_params

MPS_OOM = ("MPS backend out of memory (MPS allocated: 8.50 GiB, other allocations: 0 bytes, max allowed: 9.00 GiB). "
           "Tried to allocate 1.63 GiB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper "
           "limit for memory allocations (may cause system failure).")
RESOLUTION = 64  # the tiny model renders fast at this size
TILES = (None, 32)  # VAE tiles small enough to tile it (SD3's are 512 and 256 px)


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(footprint, "VAE_TILES", TILES)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    """Embeddings of two prompts and a LoRA, and render settings of two seeds at RESOLUTION in two steps."""
    from yem.data.text import write_embeddings

    root = tmp_path_factory.mktemp("render")
    loaded = load_params(REPO / "params.yaml")
    prompts = dataclasses.replace(loaded.prompts, validation=["a photo of sks dog", "sks dog on a beach"])
    settings = dataclasses.replace(loaded.render, seeds=[0, 1], steps=2, resolution=RESOLUTION, checkpoints=[])
    write_embeddings(loaded.model, prompts, loaded.encode, cpu_hardware(), {}, root / "embeds")
    make_lora(tiny_model_dir, root / "lora" / lora_file.WEIGHT_NAME)
    return root, loaded.model, settings


def rendered(setup, out: str, fail=lambda batch, plan: False):
    """Render into root/out, with `fail(batch, plan)` deciding which pipeline calls run out of memory; returns the
    images and each call's (images, VAE tile, ran out of memory)."""
    root, model, settings = setup
    calls, real = [], render.render_batch

    def flaky(pipeline, batch, settings, plan, dtype):
        calls.append((len(batch), plan.vae_tile, fail(batch, plan)))
        if calls[-1][-1]:
            raise RuntimeError(MPS_OOM)
        return real(pipeline, batch, settings, plan, dtype)

    render.render_batch = flaky
    try:
        index = render.render_validation(model, settings, cpu_hardware(), root / "embeds", root / "lora", root / out)
    finally:
        render.render_batch = real
    images = {f"{row}/{c['file']}": np.asarray(Image.open(root / out / row / c["file"]))
              for row in index["rows"] for c in index["cells"]}
    return images, calls


def test_several_images_per_call_where_the_budget_allows(monkeypatch):
    monkeypatch.setattr(footprint, "VAE_TILES", (None, 512, 256))
    plans = footprint.render_plans(footprint.Workload(
        backend="cpu", dtype_bytes=4, resolution=320, render_resolution=320, batch_size=1,
        checkpointing=False, rank=4, targets=4, use_t5=True, t5_tokens=77))
    assert [(p.render_images, p.vae_tile) for p in plans] == [(4, None), (2, None), (1, None), (1, 256)]
    chunked = dataclasses.replace(plans[0], render_resolution=1024, render_attention="chunked")
    # where attention is chunked (MPS), the VAE always decodes in tiles: it never sets the peak
    assert [(p.render_images, p.vae_tile) for p in footprint.render_plans(chunked)] == [(4, 512), (2, 512), (1, 512),
                                                                                       (1, 256)]


def test_out_of_memory_backs_off_to_fewer_images_then_vae_tiles_with_the_same_images(setup, capsys, monkeypatch):
    backed_off, calls = rendered(setup, "backed-off", fail=lambda batch, plan: len(batch) > 1 or not plan.vae_tile)
    # four images fit the budget at first (the tiny model); each error steps down once, then every image renders
    assert calls[:4] == [(4, None, True), (2, None, True), (1, None, True), (1, 32, False)]
    assert calls[4:] == [(1, 32, False)] * (2 * 4 - 1)  # base and lora rows × 2 prompts × 2 seeds
    notes = capsys.readouterr().err
    assert "render: out of memory at 4 image(s) per call; now 2 per call, whole-image VAE decode" in notes
    assert "now 1 per call, VAE tiles of 32 px" in notes
    # the same images as a render planned that way from the start: a back-off changes memory, not results
    original = render.first_plan
    monkeypatch.setattr(render, "first_plan", lambda *args: footprint.render_plans(original(*args))[-1])
    planned, calls = rendered(setup, "planned")
    assert set(calls) == {(1, 32, False)}
    assert planned.keys() == backed_off.keys() and all(np.array_equal(planned[k], backed_off[k]) for k in planned)


def test_out_of_memory_with_nothing_left_to_try_says_what_to_change(setup):
    with pytest.raises(HardwareError, match=r"^render.resolution: one image at 64 px ran out of memory even with "
                                            r"the VAE decoding 32 px tiles \(got 64\)\. Lower render.resolution"):
        rendered(setup, "hopeless", fail=lambda batch, plan: True)
