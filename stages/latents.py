"""Stage 3, latents: VAE posterior of every image (and its mirror with data.random_flip), cached per image."""

import json
from pathlib import Path

import click

from stages import reported, show_notes
from yem.latents import write_latents
from yem.params import load_params

PathOption = click.Path(path_type=Path)


@click.command()
@click.option("--params", "params_path", type=PathOption, default="params.yaml", show_default=True)
@click.option("--hardware", type=PathOption, required=True)
@click.option("--images", type=PathOption, required=True)
@click.option("--out", type=PathOption, required=True, help="folder of latents, one file per image")
def main(params_path: Path, hardware: Path, images: Path, out: Path) -> None:
    with reported():
        params = load_params(params_path)
        notes = write_latents(params.model, params.data, json.loads(hardware.read_text()),
                              json.loads(images.read_text())["samples"], params.root, out)
    show_notes(notes)


if __name__ == "__main__":
    main()
