"""The `yem` command (also `python -m yem`): the one-liner for people who don't use DVC directly.

`yem train` writes the options into params.yaml and runs `dvc repro`, so it reproduces exactly the pipeline
that `dvc repro` and `dvc exp run` run, and shares every cache with them.
"""

import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn

import click

from yem import atomic, paths
from yem.errors import YemError


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
    """Set params.yaml from the options and run the whole pipeline (dvc repro). Stop it any way you like (Ctrl-C,
    kill, closing the terminal): it saves a checkpoint, and the same command resumes. If the run fails,
    params.yaml is put back as it was."""
    from yem.pipeline import options, repro

    project = _project(params_path)
    given = {"model.id": model, "data.instance_dir": data, "prompts.instance": prompt, "data.resolution": resolution,
             "train.batch_size": batch_size, "train.steps": steps, "train.rank": rank, "train.alpha": alpha,
             "train.learning_rate": lr, "prompts.validation": list(validation_prompt) or None}
    current = _loaded(params_path)
    before = params_path.read_text(encoding="utf-8")
    edits = options.updates(given, options.value_in(current, "model.id"), project)
    written = _set(params_path, edits, current)
    outcome = repro.run(project, _environment())
    if outcome.status == repro.FAILED and written != before and _unchanged(params_path, written):
        atomic.write_text(params_path, before)  # a failed run leaves params.yaml as it found it
    if outcome.status != repro.DONE:
        _end(outcome)
    if output:
        shutil.copytree(project / paths.DIST, output, dirs_exist_ok=True)
        click.echo(f"result copied to {output}", err=True)
    click.echo(_where_results_are(project))


@main.command()
@click.option("--params", "params_path", type=click.Path(path_type=Path), default="params.yaml", show_default=True)
def reset(params_path: Path) -> None:
    """Put back the demo: every value `yem train` sets returns to the one params.yaml ships with (the offline tiny
    model and the bundled photos). Other keys are left as they are."""
    from yem.pipeline import options

    _project(params_path)
    _set(params_path, options.DEMO, _loaded(params_path))


@main.command()
@click.option("--commits", type=int, default=10, show_default=True,
              help="runs of this many recent commits and their experiments; 0: every commit")
@click.option("--project", type=click.Path(path_type=Path, file_okay=False), default=".", show_default=True)
def runs(commits: int, project: Path) -> None:
    """Compare the runs: one row each, with the params that differ, held-out loss before → after, final loss,
    s/step, peak memory, wall time and device. A run is an experiment (`dvc exp run`), a commit with results, or
    the workspace."""
    from yem.pipeline.runs import read_runs, table

    found = read_runs(_project(project / "params.yaml"), commits)
    if not found:
        raise YemError(f"{project.resolve()}: no runs with results yet. Run `yem train` or `dvc exp run` first.")
    click.echo(table(found))


def _project(params_path: Path) -> Path:
    project = params_path.resolve().parent
    if not (project / "dvc.yaml").exists():
        raise YemError(f"{project}: no dvc.yaml here. Run yem from the yem project folder, or pass --params "
                       f"path/to/params.yaml.")
    return project


def _loaded(params_path: Path) -> dict:
    """params.yaml as it is, sections and all, or {} when it has none (set_values then says what is wrong)."""
    from yem.params import read_yaml

    raw = read_yaml(params_path)
    return raw if isinstance(raw, dict) else {}


def _set(params_path: Path, edits: dict, current: dict) -> str:
    """Write `edits` into params.yaml (all or nothing), say what changed, and return the file's text."""
    from yem.params import set_values
    from yem.pipeline import options

    text = set_values(params_path, edits)
    for line in options.changes(edits, current):
        click.echo(line, err=True)
    return text


def _unchanged(params_path: Path, written: str) -> bool:
    """Whether params.yaml still holds what we wrote (nobody edited it while the pipeline ran)."""
    return params_path.read_text(encoding="utf-8") == written


def _environment() -> dict[str, str]:
    """This Python's environment first on PATH: the stages run `python -m stages.x`."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "DVC_NO_ANALYTICS": "1"}


def _end(outcome) -> NoReturn:
    """Exit as the run ended; say how it stopped unless a stage or dvc already has."""
    if not outcome.said:
        try:  # after a hangup the terminal may be gone
            click.echo(f"yem: stopped by {outcome.signal}. Run the same command again to continue: finished "
                       f"stages and saved checkpoints are kept.", err=True)
        except OSError:
            pass
    sys.exit(outcome.status)


def _where_results_are(project: Path) -> str:
    dist = project / paths.DIST
    shown = Path(os.path.relpath(dist)) if dist.is_relative_to(Path.cwd()) else dist
    loras = "\n".join(f"  LoRA   {shown / f.name}" for f in sorted(dist.glob("*.safetensors")))
    return (f"Done. The results are in {shown}/:\n{loras}\n  grid   {shown / 'images' / 'grid.png'} (top row "
            f"without the LoRA, bottom row with it)\n  loss   {shown / 'images' / 'loss.png'}\n  card   "
            f"{shown / 'README.md'}\nCompare runs: yem runs. Share: yem push --repo-id <you>/<name>.")


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
