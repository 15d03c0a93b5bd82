"""Stage 5, render: validation images per prompt × seed without and with the LoRA, and a comparison grid."""

import sys
from contextlib import nullcontext
from pathlib import Path

import click

from stages import PathOption, hardware_option, log_option, params_option, reported, show_notes
from yem import atomic
from yem.hardware import fallbacks, launch
from yem.hardware.record import Hardware
from yem.outputs.render import no_change_warning, render_validation
from yem.params import load_params


@click.command()
@params_option
@hardware_option
@click.option("--embeds", type=PathOption, required=True)
@click.option("--lora", "lora_dir", type=PathOption, required=True)
@click.option("--out", type=PathOption, required=True, help="folder of PNGs, grid.png and index.json")
@log_option
def main(params_path: Path, hardware: Path, embeds: Path, lora_dir: Path, out: Path, log: Path) -> None:
    with reported():
        params = load_params(params_path)
        machine = Hardware.load(hardware)
        processes = launch.process_count(params.render.devices, machine.backend, "render.devices")
        if processes > 1 and not launch.inside_launch():  # prompts × seeds shared out over the devices
            sys.exit(launch.relaunch("stages.render", sys.argv[1:], processes))
        with fallbacks.watching(machine.backend) as watch, \
                atomic.staged_dir(out) if launch.is_main_process() else nullcontext() as staging:
            index = render_validation(params.model, params.render, machine, embeds, lora_dir, staging)
            if index is not None:
                atomic.write_json(staging / "index.json", index)
    if launch.is_main_process():
        show_notes([*watch.report().note("render"), *filter(None, [no_change_warning(index)])])
        atomic.write_json(log, watch.report().to_json())


if __name__ == "__main__":
    main()
