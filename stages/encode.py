"""Stage 2, encode: CLIP-L, CLIP-G and T5 embeddings of every prompt and caption, one encoder at a time."""

import json
from pathlib import Path

import click

from stages import reported, show_notes
from yem.params import load_params
from yem.text import write_embeddings

PathOption = click.Path(path_type=Path)


@click.command()
@click.option("--params", "params_path", type=PathOption, default="params.yaml", show_default=True)
@click.option("--hardware", type=PathOption, required=True)
@click.option("--captions", type=PathOption, required=True)
@click.option("--out", type=PathOption, required=True, help="folder of embeddings, one file per distinct text")
def main(params_path: Path, hardware: Path, captions: Path, out: Path) -> None:
    with reported():
        params = load_params(params_path)
        manifest = json.loads(captions.read_text())
        notes = write_embeddings(params.model, params.prompts, params.encode, json.loads(hardware.read_text()),
                                 manifest["captions"], out, manifest.get("files", {}))
    show_notes(notes)


if __name__ == "__main__":
    main()
