"""Stage 3, latents: VAE posterior of every image (and its mirror with data.random_flip), cached per image."""

import json
from pathlib import Path

import click

from stages import PathOption, hardware_option, log_option, params_option, reported, show_notes
from yem import atomic
from yem.data.latents import write_latents
from yem.hardware import fallbacks
from yem.hardware.record import Hardware
from yem.params import load_params


@click.command()
@params_option
@hardware_option
@click.option("--images", type=PathOption, required=True)
@click.option("--out", type=PathOption, required=True, help="folder of latents, one file per image")
@log_option
def main(params_path: Path, hardware: Path, images: Path, out: Path, log: Path) -> None:
    with reported():
        params = load_params(params_path)
        machine = Hardware.load(hardware)
        with fallbacks.watching(machine.backend) as watch:
            notes = write_latents(params.model, params.data, machine, json.loads(images.read_text())["samples"],
                                  params.root, out)
    show_notes(notes + watch.report().note("latents"))
    atomic.write_json(log, watch.report().to_json())


if __name__ == "__main__":
    main()
