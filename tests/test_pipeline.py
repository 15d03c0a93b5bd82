"""The whole DVC pipeline on the tiny model in a temporary git repository, started by the one-liner, then
incremental recomputation asserted from what DVC actually ran."""

import json
import re
import shlex
import sys

import pytest
from huggingface_hub import ModelCard
from PIL import Image

from tests.conftest import REPO, make_project, run
from yem.model import lora_file
from yem.outputs.render import GRID_CELL, LABEL_HEIGHT, ROW_LABEL_WIDTH
from yem.params import load_params, set_values

pytestmark = pytest.mark.pipeline
PROMPT = "a photo of zwx cat"  # the repository's params.yaml holds no prompt about this subject
ALWAYS = {"preflight"}  # the probe runs on every repro by design; its outputs decide what else reruns


def ran(result) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", result.stdout + result.stderr))


def repro(folder) -> set[str]:
    return ran(run([sys.executable, "-m", "dvc", "repro"], folder))


@pytest.fixture(scope="module")
def one_liner(tmp_path_factory, tiny_model_dir):
    """The project, and what the one-liner that built it printed."""
    folder = make_project(tmp_path_factory.mktemp("pipeline") / "project")
    set_values(folder / "params.yaml", {"render.steps": 2, "render.seeds": [0], "train.checkpoint_every": 10,
                                        "export.formats": ["diffusers", "comfyui", "kohya"]})
    result = run([sys.executable, "-m", "yem", "train", "--model", "tiny", "--data", "data/instance", "--prompt",
                  PROMPT, "--resolution", "64", "--batch-size", "auto", "--steps", "30", "--output", "result"], folder)
    assert ran(result) == {"preflight", "encode", "latents", "train", "render", "card"}
    return folder, result


@pytest.fixture(scope="module")
def project(one_liner):
    return one_liner[0]


def this_machine() -> tuple[str, str]:
    """The backend and precision preflight chooses here: cpu/float32 on CI, mps or cuda in half precision."""
    from yem.hardware import device, precision

    backend = device.pick_backend("auto")
    return backend, precision.pick_dtype(backend, "auto")


def test_one_liner_produces_every_artefact(project):
    hardware = json.loads((project / "build/preflight.json").read_text())
    assert (hardware["backend"], hardware["dtype"]) == this_machine()
    assert len(json.loads((project / "build/latents/index.json").read_text())["samples"]) == 6
    assert (project / "build/lora/pytorch_lora_weights.safetensors").stat().st_size > 0
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert metrics["steps"] == 30 and metrics["heldout_loss_after"] < metrics["heldout_loss_before"]
    assert len((project / "metrics/train_steps.tsv").read_text().splitlines()) == 31
    validation = json.loads((project / "build/validation/index.json").read_text())
    assert validation["rows"] == ["base", "lora"] and len(validation["cells"]) == 2  # 2 derived prompts × 1 seed
    grid = Image.open(project / "build/validation/grid.png")
    assert grid.size == (ROW_LABEL_WIDTH + 2 * GRID_CELL, LABEL_HEIGHT + 2 * GRID_CELL)
    for folder in (project / "dist", project / "result"):
        card = ModelCard.load(folder / "README.md")
        assert card.data.instance_prompt == PROMPT and "tiny" in card.text
        for name in ("pytorch_lora_weights", "yem-sd3-lora_comfyui", "yem-sd3-lora_kohya"):
            assert (folder / f"{name}.safetensors").exists(), name
        assert (folder / "images/lora/p0-s0.png").exists() and (folder / "images/grid.png").exists()
    shown = json.loads(run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], project).stdout)
    (workspace,) = shown.values()  # keyed "" or "workspace" depending on the DVC version
    assert workspace["data"]["metrics/train.json"]["data"] == metrics
    assert metrics["backend"] == hardware["backend"] and metrics["nonfinite_steps"] == 0
    for stage in ("encode", "latents", "render"):  # what ran on the CPU in place of MPS: nothing, here
        assert json.loads((project / f"logs/{stage}.json").read_text())["cpu_fallback_ops"] == [], stage
    assert "| CPU fallbacks in training | none |" in ModelCard.load(project / "dist/README.md").text


def test_validation_follows_the_one_liners_prompt(project):
    """Only --prompt given: every rendered prompt and every card widget is about the new subject."""
    prompts = [cell["prompt"] for cell in json.loads((project / "build/validation/index.json").read_text())["cells"]]
    assert prompts == [PROMPT, f"{PROMPT}, on a beach at sunset"]
    widgets = ModelCard.load(project / "dist/README.md").data.widget
    assert len(widgets) == 2 and all("zwx cat" in widget["text"] for widget in widgets)


def test_the_one_liner_ends_by_saying_where_the_results_are_and_nothing_of_dvc_s_advice(one_liner):
    folder, result = one_liner
    shown = dict(re.findall(r"^  (LoRA|grid|loss|card) +(\S+)", result.stdout, re.MULTILINE))
    assert set(shown) == {"LoRA", "grid", "loss", "card"}, result.stdout
    assert all((folder / path).is_file() for path in shown.values()), shown
    said = result.stdout + result.stderr
    assert not any(advice in said for advice in ("git add dvc.lock", "autostage", "dvc push", "didn't change"))
    assert "params.yaml train.steps: 120 → 30" in result.stderr  # each value the options changed, once


def test_second_repro_runs_nothing_but_the_probe(project):
    assert repro(project) == ALWAYS


def test_rank_change_reruns_only_train_render_card_and_alpha_follows(project):
    set_values(project / "params.yaml", {"train.rank": 8})  # what `dvc exp run -S train.rank=8` writes
    assert repro(project) - ALWAYS == {"train", "render", "card"}
    header = lora_file.read_metadata(project / "build/lora/pytorch_lora_weights.safetensors")
    assert header["yem.rank"] == "8" and header["yem.alpha"] == "8.0"  # alpha: null follows the rank


def test_editing_one_image_reruns_latents_and_later_but_not_encode(project):
    path = project / "data/instance/dog01.png"
    image = Image.open(path).convert("RGB")
    image.putpixel((5, 5), (255, 0, 0))
    image.save(path)
    assert repro(project) - ALWAYS == {"latents", "train", "render", "card"}


def test_changing_the_prompt_reruns_encode_and_later_but_not_latents(project):
    set_values(project / "params.yaml", {"prompts.instance": "a photo of zwx dog"})
    assert repro(project) - ALWAYS == {"encode", "train", "render", "card"}


def test_experiment_reruns_only_what_the_param_touches(project):
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "-m", "baseline"], project)
    result = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "train.rank=2", "-n", "rank2"], project)
    assert ran(result) - ALWAYS == {"train", "render", "card"}
    table = json.loads(run([sys.executable, "-m", "dvc", "exp", "show", "--json"], project).stdout)
    names = [exp.get("name") for row in table for exp in row.get("experiments") or [] for exp in exp["revs"]]
    assert "rank2" in names


def readme_command(start: str) -> list[str]:
    (line,) = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith(start)]
    return shlex.split(line.split("  #")[0])


def test_yem_runs_shows_one_readable_row_per_run_with_the_params_that_differ(project):
    run([sys.executable, "-m", "dvc", "exp", "run", "-S", "render.steps=1", "-n", "quick"], project)  # render, card
    header, *rows = run([sys.executable, "-m", "yem", "runs"], project).stdout.splitlines()
    assert re.split(r"\s{2,}", header)[:3] == ["run", "render.steps", "train.rank"]  # what differs, not steps
    assert all(name in header for name in ("held-out loss", "final loss", "s/step", "peak GiB", "wall", "device"))
    assert sorted(row.split()[:3] for row in rows) == [["main", "2", "8"], ["quick", "1", "2"], ["rank2", "2", "2"]]
    assert all(re.search(r"\d\.\d+ → \d\.\d+", row) for row in rows) and all(len(row) <= 120 for row in rows)


def test_the_readme_s_dvc_exp_show_fits_a_160_column_terminal(project):
    table = run([sys.executable, "-m", *readme_command("dvc exp show")], project, env={"COLUMNS": "160"}).stdout
    assert "…" not in table and max(map(len, table.splitlines())) <= 160, table
    assert all(name in table for name in ("[quick]", "[rank2]", "train.rank", "heldout_loss_after", "s_per_step"))


def test_dvc_plots_show_warns_of_nothing_and_plots_diff_draws_every_run(project):
    """The grid was declared as data ("DVC failed to load some plots"); an image plot is declared by its path."""
    shown = run([sys.executable, "-m", "dvc", "plots", "show", "--json"], project)
    assert shown.stderr == "" and "errors" not in json.loads(shown.stdout)
    kinds = {path: {plot["type"] for plot in plots} for path, plots in json.loads(shown.stdout)["data"].items()}
    assert kinds == {"build/validation/grid.png": {"image"}, "metrics/train_steps.tsv": {"vega"}}
    diff = run([sys.executable, "-m", "dvc", "plots", "diff", "rank2", "quick", "--json"], project)
    (curve,) = json.loads(diff.stdout)["data"]["metrics/train_steps.tsv"]
    assert diff.stderr == "" and curve["revisions"] == ["rank2", "quick"]


def test_the_export_file_names_the_readme_gives_are_the_ones_written(project, tmp_path):
    readme = (REPO / "README.md").read_text()
    named = set(re.findall(r"`(?:dist/)?((?:<name>_\w+|pytorch_lora_weights)\.safetensors)`", readme))
    assert named == {"pytorch_lora_weights.safetensors", "<name>_comfyui.safetensors", "<name>_kohya.safetensors"}
    name = load_params(project / "params.yaml").export.name
    assert all((project / "dist" / file.replace("<name>", name)).is_file() for file in named)
    run([sys.executable, "-m", "yem", "export", "--format", "comfyui", "--lora", "dist", "--out", str(tmp_path)],
        project)  # a LoRA trained earlier keeps its name
    assert [p.name for p in tmp_path.iterdir()] == [f"{name}_comfyui.safetensors"]


def test_a_fresh_clone_restores_everything_from_a_shared_remote(project, tmp_path):
    """One machine pushes the cache and run-cache; a fresh clone pulls them and `dvc repro` runs no stage
    (beyond the always-run probe): embeddings, latents, LoRA, renders and the card come from the remote."""
    dvc = [sys.executable, "-m", "dvc"]
    remote = tmp_path / "remote"
    run([*dvc, "remote", "add", "-d", "shared", str(remote)], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "-m", "results and remote"], project)
    run([*dvc, "push", "--run-cache"], project)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    run([*dvc, "pull", "--run-cache"], clone)
    assert repro(clone) == ALWAYS
    for path in ("build/embeds/index.json", "build/latents/index.json", "build/lora/pytorch_lora_weights.safetensors",
                 "build/validation/grid.png", "dist/README.md"):
        assert (clone / path).read_bytes() == (project / path).read_bytes(), path


def test_a_failed_one_liner_is_one_line_and_leaves_params_yaml_and_dist_as_they_were(project, tmp_path):
    """It printed the stage's line, DVC's "ERROR: failed to reproduce", then "dvc repro failed … Fix it", and kept
    the bad value in params.yaml."""
    (tmp_path / "empty").mkdir()
    params, dist = (project / "params.yaml").read_bytes(), {p: p.read_bytes() for p in (project / "dist").rglob("*.*")}
    result = run([sys.executable, "-m", "yem", "train", "--data", str(tmp_path / "empty")], project, check=False)
    assert result.returncode == 1
    said = [line for line in result.stderr.splitlines() if line.strip()]
    assert said[-1].startswith("Error: ") and "empty" in said[-1], result.stderr
    assert said[:-1] == [f"params.yaml data.instance_dir: data/instance → {tmp_path / 'empty'}"], result.stderr
    assert (project / "params.yaml").read_bytes() == params
    assert {p: p.read_bytes() for p in (project / "dist").rglob("*.*")} == dist
