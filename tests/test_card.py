"""dist/: validation grid layout (checkpoint rows included), the LoRA files per export format, a model card that
validates and points at images that exist, and `yem push` failing cleanly offline."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from huggingface_hub import ModelCard
from PIL import Image

from tests.conftest import REPO, cpu_hardware
from tests.test_export import make_lora
from yem.model import export, lora_file
from yem.outputs.card import Results, write_card
from yem.params import load_params
from yem.training import metrics

PROMPTS = ["a photo of sks dog", "a photo of sks dog in a bucket"]
SEEDS = [0, 1]
CHECKPOINT = 10
REQUIRED_TAGS = {"text-to-image", "lora", "sd3", "diffusers-training", "template:sd-lora"}
TRAIN_METRICS = {"steps": 20, "loss_final": 0.41, "loss_best": 0.37, "heldout_loss_before": 0.52,
                 "heldout_loss_after": 0.44, "s_per_step": 0.25, "peak_memory_gib": 1.5, "wall_s": 3725.0,
                 "batch_size": 1, "gradient_accumulation": 2, "world_size": 1, "effective_batch_size": 2,
                 "gradient_checkpointing": False, "resumed_from_step": 0, "backend": "cpu", "dtype": "float32",
                 "device_name": "Test CPU", "torch": "2.13.0", "resolution": 64,
                 "buckets": {"64×64": 2, "48×80": 1}, "lora_effect": "measurable", "lora_delta": 0.02,
                 "heldout_change": -0.15}


@pytest.fixture(scope="module")
def params():
    loaded = load_params(REPO / "params.yaml")
    prompts = dataclasses.replace(loaded.prompts, validation=PROMPTS)
    render = dataclasses.replace(loaded.render, seeds=SEEDS, steps=2, resolution=64, checkpoints=[CHECKPOINT])
    return dataclasses.replace(loaded, prompts=prompts, render=render)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, params):
    """A LoRA (final and one intermediate adapter), rendered by the render stage's own function."""
    from yem.data.text import write_embeddings
    from yem.outputs.render import render_validation

    root = tmp_path_factory.mktemp("run")
    hardware = cpu_hardware()
    write_embeddings(params.model, params.prompts, params.encode, hardware, {}, root / "embeds")
    make_lora(tiny_model_dir, root / "lora" / lora_file.WEIGHT_NAME, seed=0)
    make_lora(tiny_model_dir, root / "lora" / "steps" / f"step-{CHECKPOINT:08d}.safetensors", seed=1)
    index = render_validation(params.model, params.render, hardware, root / "embeds", root / "lora",
                              root / "validation")
    (root / "validation" / "index.json").write_text(json.dumps(index))
    metrics.write_json(root / "train.json", TRAIN_METRICS)
    metrics.write_tsv(root / "steps.tsv", [{"step": i, "loss": 1.0 / i, "lr": 1e-3} for i in range(1, 21)])
    samples = {f"instance/dog{i}": {"path": f"data/dog{i}.png", "sha256": "0"} for i in range(3)}
    samples["prior/dog-class0"] = {"path": "data/class0.png", "sha256": "0"}
    (root / "images.json").write_text(json.dumps({"samples": samples}))
    return root, index


def results(root, **metric_changes) -> Results:
    found = Results.load(root / "lora", root / "validation", root / "train.json", root / "steps.tsv",
                         root / "images.json")
    return dataclasses.replace(found, metrics={**found.metrics, **metric_changes})


def test_grid_has_a_row_per_adapter_and_a_column_per_prompt_and_seed(run):
    from yem.outputs.render import GRID_CELL, LABEL_HEIGHT, ROW_LABEL_WIDTH

    root, index = run
    assert index["rows"] == ["base", f"step {CHECKPOINT}", "lora"]
    assert [(c["prompt"], c["seed"]) for c in index["cells"]] == [(p, s) for p in PROMPTS for s in SEEDS]
    grid = np.asarray(Image.open(root / "validation" / index["grid"]).convert("RGB"), dtype=np.float64)
    columns, rows = len(PROMPTS) * len(SEEDS), len(index["rows"])
    assert grid.shape[:2] == (LABEL_HEIGHT + rows * GRID_CELL, ROW_LABEL_WIDTH + columns * GRID_CELL)
    for r, row in enumerate(index["rows"]):
        for c, cell in enumerate(index["cells"]):
            image = Image.open(root / "validation" / row.replace(" ", "-") / cell["file"]).convert("RGB")
            expected = np.asarray(image.resize((GRID_CELL, GRID_CELL), Image.Resampling.LANCZOS), dtype=np.float64)
            top, left = LABEL_HEIGHT + r * GRID_CELL, ROW_LABEL_WIDTH + c * GRID_CELL
            assert np.abs(grid[top:top + GRID_CELL, left:left + GRID_CELL] - expected).max() <= 1, (row, cell)
    first = {row: np.asarray(Image.open(root / "validation" / row.replace(" ", "-") / "p0-s0.png"), dtype=float)
             for row in index["rows"]}
    assert np.abs(first["base"] - first["lora"]).max() > 1, "the LoRA row shows no change"
    assert np.abs(first[f"step {CHECKPOINT}"] - first["lora"]).max() > 1, "the checkpoint row repeats the final one"


@pytest.fixture(scope="module")
def dist(run, params, tmp_path_factory):
    root, _ = run
    out = tmp_path_factory.mktemp("dist")
    settings = dataclasses.replace(params.export, formats=["diffusers", "comfyui", "kohya"])
    write_card(params.model, params.train, settings, results(root), out)
    return out


def test_dist_holds_each_requested_format_with_the_same_adapter(run, dist):
    root, _ = run
    source, _ = export.read(root / "lora" / lora_file.WEIGHT_NAME)
    names = {"diffusers": lora_file.WEIGHT_NAME, "comfyui": "yem-sd3-lora_comfyui.safetensors",
             "kohya": "yem-sd3-lora_kohya.safetensors"}
    for fmt, name in names.items():
        modules, header = export.read(dist / name)
        assert header["yem.layout"] == fmt and header["yem.instance_prompt"] == "a photo of sks dog"
        assert sorted(modules) == sorted(source)
        assert all(np.allclose(modules[m].delta(), source[m].delta(), atol=1e-9) for m in source), fmt


def test_card_loads_back_with_valid_front_matter_and_existing_widget_images(dist, run):
    _, index = run
    card = ModelCard.load(dist / "README.md")
    data = card.data.to_dict()
    assert REQUIRED_TAGS <= set(data["tags"])
    assert data["license"] == "other" and data["instance_prompt"] == "a photo of sks dog"
    assert "base_model" not in data  # "tiny" is no Hub id
    assert [w["text"] for w in data["widget"]] == [c["prompt"] for c in index["cells"]]
    for entry in data["widget"]:
        assert (dist / entry["output"]["url"]).is_file(), entry
    assert ModelCard(str(card)).content == card.content  # what save wrote is what load reads


def test_card_body_shows_images_that_exist_usage_and_training(dist):
    text = ModelCard.load(dist / "README.md").text
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert set(images) == {"images/grid.png", "images/loss.png"}
    assert all((dist / image).is_file() for image in images)
    assert Image.open(dist / "images/loss.png").size[0] > 0
    assert 'weight_name="pytorch_lora_weights.safetensors"' in text and "load_lora_weights" in text
    assert "yem-sd3-lora_comfyui.safetensors" in text and "LoraLoaderModelOnly" in text
    assert "| instance images | 3 |" in text and "| class (prior) images | 1 |" in text
    assert "| rank / alpha | 4 / 8 (scale folded into the weights: the file records alpha = rank) |" in text
    assert "| steps | 20 |" in text and "| aspect-ratio buckets (images) | 64×64 (2), 48×80 (1) |" in text
    assert "does nothing" not in text
    assert "| batch × accumulation × devices | 1 × 2 × 1 |" in text
    assert "base / step 10 / lora" in text
    for row in ("| device | Test CPU (cpu, float32) |", "| seconds per step (median) | 0.25 |",
                "| peak memory | 1.5 GiB |", "| wall time | 1 h 02 min |"):
        assert row in text, row
    assert "thermal" not in text  # not recorded by this run, so no row


def test_card_renders_thermal_and_machine_facts_when_training_recorded_them(run, params, tmp_path):
    root, _ = run
    recorded = results(root, thermal_pauses=2, thermal_throttled_min=3.5, thermal_paused_min=1.25,
                       memory_total_gib=64.0, os="macOS 15.1", loss_scale=16384.0, loss_scale_skipped_steps=3,
                       cpu_fallback_ops="aten::col2im 0.12 s; 2.5% of 4.8 s sampled")
    text = write_card(params.model, params.train, params.export, recorded, tmp_path).text
    for row in ("| thermal pauses | 2 |", "| throttled | 3.5 min |", "| paused for heat | 1.25 min |",
                "| memory | 64 GiB |", "| operating system | macOS 15.1 |",
                "| fp16 loss scale | 16384 (3 overflowing steps skipped) |",
                "| CPU fallbacks in training | aten::col2im 0.12 s; 2.5% of 4.8 s sampled |",
                "| CPU fallbacks in rendering | none |"):  # the render index of this test lists none
        assert row in text, row


def test_card_names_a_hub_base_model_and_only_the_files_it_ships(run, params, tmp_path):
    root, _ = run
    model = dataclasses.replace(params.model, id="stabilityai/stable-diffusion-3-medium-diffusers", revision="abc")
    settings = dataclasses.replace(params.export, formats=["kohya"])
    card = write_card(model, params.train, settings, results(root), tmp_path)
    assert card.data.base_model == "stabilityai/stable-diffusion-3-medium-diffusers"
    assert card.data.to_dict()["base_model_relation"] == "adapter"
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["yem-sd3-lora_kohya.safetensors"]
    assert "load_lora_weights" not in card.text and "`yem-sd3-lora_kohya.safetensors` into" in card.text
    assert "@ `abc`" in card.text


def yem_push(dist, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "yem", "push", "--repo-id", "someone/rex", "--dist", str(dist)],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=120)


def test_push_offline_or_without_a_token_fails_with_one_line_saying_what_to_do(dist, tmp_path):
    base = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    offline = yem_push(dist, {**base, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 1 and "Traceback" not in offline.stderr
    assert offline.stderr.strip().count("\n") == 0 and "HF_HUB_OFFLINE" in offline.stderr
    no_token = yem_push(dist, {**base, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")})
    assert no_token.returncode == 1 and "Traceback" not in no_token.stderr
    assert "hf auth login" in no_token.stderr and no_token.stderr.strip().count("\n") == 0
    nothing = yem_push(tmp_path / "empty", {**base, "HF_HUB_OFFLINE": "1"})
    assert nothing.returncode == 1 and "no model card here" in nothing.stderr


def test_comfyui_is_pointed_at_the_diffusers_file_whatever_alpha_when_only_it_ships(run, params, tiny_model_dir,
                                                                                     tmp_path):
    """yem's diffusers file carries its scale in B, so ComfyUI (which ignores the header) reads it right even for
    alpha 8, rank 4: no need to ship the comfyui file."""
    root, _ = run
    settings = dataclasses.replace(params.export, formats=["diffusers"])
    text = write_card(params.model, params.train, settings, results(root), tmp_path / "alpha8").text
    assert "copy `pytorch_lora_weights.safetensors` into `ComfyUI/models/loras/`" in text


def test_a_lora_that_does_nothing_carries_a_warning_on_its_card(run, params, tmp_path):
    root, validation = run
    still = results(root, lora_effect="none", lora_delta=0.0, heldout_change=0.0)
    text = write_card(params.model, params.train, params.export, still, tmp_path / "still").text
    assert "> **Warning: this LoRA does nothing measurable**: its held-out loss changed by +0.000% and no " in text
    same = tmp_path / "same-renders"
    shutil.copytree(root / "validation", same)
    (same / "index.json").write_text(json.dumps({**validation, "lora_change": 0.0, "lora_visible": False}))
    text = write_card(params.model, params.train, params.export, dataclasses.replace(results(root), validation=same),
                      tmp_path / "same").text
    assert "Warning: this LoRA does nothing measurable**: its renders differ from the base model's by 0.00" in text
