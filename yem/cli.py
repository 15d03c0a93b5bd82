"""The `yem` command (also `python -m yem`): the one-liner for people who don't use DVC directly.

`yem train` writes the options into params.yaml and runs `dvc repro`, so it reproduces exactly the pipeline
that `dvc repro` and `dvc exp run` run, and shares every cache with them.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import click

from yem import paths
from yem.errors import YemError

# When a real model replaces the tiny demo model, keys the user did not set take values suited to SD3.
# data.resolution becomes the model's own (its config's sample_size × 8) unless --resolution is given.
REAL_MODEL_DEFAULTS = {"train.learning_rate": 1e-4, "train.steps": 500, "render.steps": 28,
                       "render.guidance_scale": 7.0}
NATIVE_RESOLUTION = 1024  # every SD3 and SD3.5 model: what a model yem cannot read the config of trains at


class Commands(click.Group):
    """yem's commands: a YemError from any of them is one line on stderr and exit status 1, without traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except YemError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=Commands)
@click.version_option(package_name="yem")
def main() -> None:
    """DreamBooth LoRA for Stable Diffusion 3 on Apple Silicon, CUDA and CPU."""


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter("expected a whole number or 'auto'") from None


@main.command()
@click.option("--model", help="SD3 model: a hub id, a local diffusers folder, or 'tiny' (offline demo)")
@click.option("--data", type=click.Path(path_type=Path), help="folder of your photos (+ same-name .txt captions)")
@click.option("--prompt", help="instance prompt with a trigger word, e.g. 'a photo of sks dog'")
@click.option("--resolution", type=int, help="training resolution in pixels (default: the model's own, 1024 for SD3)")
@click.option("--batch-size", callback=lambda ctx, p, v: None if v is None else _batch_size(v),
              help="images per step, or 'auto' to pick the largest that fits")
@click.option("--steps", type=int, help="optimizer steps")
@click.option("--rank", type=int, help="LoRA rank (alpha follows it unless --alpha is given)")
@click.option("--alpha", type=float, help="LoRA alpha (scale = alpha / rank)")
@click.option("--lr", type=float, help="learning rate")
@click.option("--validation-prompt", multiple=True,
              help="a prompt to render; repeat for several (default: derived from --prompt)")
@click.option("--output", type=click.Path(path_type=Path), help="copy the result (dist/) into this folder")
@click.option("--params", "params_path", type=click.Path(path_type=Path), default="params.yaml", show_default=True)
def train(model, data, prompt, resolution, batch_size, steps, rank, alpha, lr, validation_prompt, output,
          params_path) -> None:
    """Set params.yaml from the options and run the whole pipeline (dvc repro)."""
    from yem.params import load_params, set_values

    project = params_path.resolve().parent
    if not (project / "dvc.yaml").exists():
        raise YemError(f"{project}: no dvc.yaml here. Run yem from the yem project folder, or pass --params "
                       f"path/to/params.yaml.")
    explicit = {"model.id": model, "data.instance_dir": _portable(data, project), "prompts.instance": prompt,
                "data.resolution": resolution, "train.batch_size": batch_size, "train.steps": steps,
                "train.rank": rank, "train.alpha": alpha, "train.learning_rate": lr,
                "prompts.validation": list(validation_prompt) or None}
    updates = {key: value for key, value in explicit.items() if value is not None}
    if rank is not None and alpha is None:
        updates["train.alpha"] = None  # null: alpha follows the rank
    if prompt is not None and not validation_prompt:
        updates["prompts.validation"] = None  # null: rendered prompts follow the new instance prompt
    if model not in (None, "tiny"):
        defaults = {**REAL_MODEL_DEFAULTS, "data.resolution": _native_resolution(model)}
        updates = {**{k: v for k, v in defaults.items() if k not in updates}, **updates}
    if updates:
        set_values(params_path, updates)
        for key, value in updates.items():
            click.echo(f"params.yaml {key}: {'null' if value is None else value}", err=True)
    load_params(params_path)
    _repro(project)
    if output:
        shutil.copytree(project / paths.DIST, output, dirs_exist_ok=True)
        click.echo(f"result copied to {output}", err=True)


def _native_resolution(model_id: str) -> int:
    """The resolution `model_id` was trained at, from its config (downloaded or local) or yem's table of SD3 models,
    without loading weights; SD3's 1024 px for one yem cannot see yet."""
    from yem.model.architecture import architecture_for

    try:
        return architecture_for(model_id).native_resolution
    except YemError:
        return NATIVE_RESOLUTION


def _portable(folder: Path | None, project: Path) -> str | None:
    if folder is None:
        return None
    folder = folder.expanduser().resolve()
    return folder.relative_to(project).as_posix() if folder.is_relative_to(project) else str(folder)


def _repro(project: Path) -> None:
    """Run `dvc repro` with this Python's environment first on PATH (the stages run `python -m stages.x`)."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "DVC_NO_ANALYTICS": "1"}
    dvc = shutil.which("dvc", path=env["PATH"])
    if dvc is None:
        raise YemError("dvc: not found next to this Python. Install yem's dependencies: pip install -e .")
    result = subprocess.run([dvc, "repro"], cwd=project, env=env)
    if result.returncode != 0:
        raise YemError(f"dvc repro failed (exit {result.returncode}); the stage's message is above. Fix it and "
                       f"rerun the same command: finished stages are not repeated.")


@main.command("export")
@click.option("--format", "fmt", type=click.Choice(["diffusers", "comfyui", "kohya"]), required=True,
              help="diffusers: load_lora_weights; comfyui: + .alpha tensors; kohya: sd-scripts layout")
@click.option("--lora", "source", type=click.Path(path_type=Path), required=True,
              help="a LoRA file (any of the three layouts) or the folder holding it, e.g. dist or build/lora")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="the .safetensors file to write, or a folder to write it into")
def export_lora(fmt: str, source: Path, out: Path) -> None:
    """Convert a LoRA trained earlier into another tool's layout; its provenance metadata is kept."""
    from yem.model import export, lora_file

    source = lora_file.resolve(source)
    target = out if out.suffix == ".safetensors" else out / export.file_name(fmt, export.lora_name(source))
    if target.resolve() == source.resolve():
        raise YemError(f"--out: is the source file itself (got {out}). Write to another file or folder.")
    export.convert(source, fmt, target)
    click.echo(f"{fmt} LoRA written to {target}", err=True)


@main.command()
@click.option("--repo-id", required=True, help="the Hub model repo, <user or org>/<name> (created if missing)")
@click.option("--private", is_flag=True, help="create the repo as private")
@click.option("--dist", type=click.Path(path_type=Path), default=str(paths.DIST), show_default=True,
              help="the folder the card stage wrote")
def push(repo_id: str, private: bool, dist: Path) -> None:
    """Upload dist/ (LoRA files, images, model card) to the Hugging Face Hub; needs a token that can write."""
    from yem.outputs.card import push as push_to_hub

    url = push_to_hub(dist, repo_id, private)
    click.echo(f"uploaded {dist} to {url}", err=True)


@main.command()
@click.option("--params", "params_path", type=click.Path(path_type=Path), default="params.yaml", show_default=True)
@click.option("--memory", "memory_gb", type=click.IntRange(4, 1024), multiple=True,
              help="answer for a Mac with this many GB of unified memory instead of this machine; repeat for a table")
def doctor(params_path: Path, memory_gb: tuple[int, ...]) -> None:
    """Explain this machine: device, precision, memory budget, and whether each stage of params.yaml fits."""
    from yem.doctor import format_report, gather, mac_table
    from yem.params import load_params

    params = load_params(params_path) if params_path.exists() else None
    if memory_gb:
        click.echo(mac_table(params, tuple(sorted(set(memory_gb)))), nl=False)
        return
    click.echo(format_report(gather(params)), nl=False)
