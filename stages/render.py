"""Stage 5, render: validation images per prompt × seed without and with the LoRA, and a comparison grid."""

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import click

from stages import reported
from yem import atomic, launch
from yem.params import load_params
from yem.render import render_validation

PathOption = click.Path(path_type=Path)


@click.command()
@click.option("--params", "params_path", type=PathOption, default="params.yaml", show_default=True)
@click.option("--hardware", type=PathOption, required=True)
@click.option("--embeds", type=PathOption, required=True)
@click.option("--lora", "lora_dir", type=PathOption, required=True)
@click.option("--out", type=PathOption, required=True, help="folder of PNGs, grid.png and index.json")
def main(params_path: Path, hardware: Path, embeds: Path, lora_dir: Path, out: Path) -> None:
    with reported():
        params = load_params(params_path)
        facts = json.loads(hardware.read_text())
        processes = launch.process_count(params.render.devices, facts["backend"], "render.devices")
        if processes > 1 and not launch.inside_launch():  # prompts × seeds shared out over the devices
            sys.exit(launch.relaunch("stages.render", sys.argv[1:], processes))
        with atomic.staged_dir(out) if launch.is_main_process() else nullcontext() as staging:
            index = render_validation(params.model, params.render, facts, embeds, lora_dir, staging)
            if index is not None:
                atomic.write_json(staging / "index.json", index)


if __name__ == "__main__":
    main()
