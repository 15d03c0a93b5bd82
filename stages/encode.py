"""Stage 2, encode: CLIP-L, CLIP-G and T5 embeddings of every prompt and caption, one encoder at a time."""

import json
from pathlib import Path

import click

from stages import PathOption, hardware_option, log_option, params_option, reported, show_notes
from yem import atomic
from yem.data.text import write_embeddings
from yem.hardware import fallbacks
from yem.hardware.record import Hardware
from yem.params import load_params


@click.command()
@params_option
@hardware_option
@click.option("--captions", type=PathOption, required=True)
@click.option("--out", type=PathOption, required=True, help="folder of embeddings, one file per distinct text")
@log_option
def main(params_path: Path, hardware: Path, captions: Path, out: Path, log: Path) -> None:
    with reported():
        params = load_params(params_path)
        manifest = json.loads(captions.read_text())
        machine = Hardware.load(hardware)
        with fallbacks.watching(machine.backend) as watch:
            notes = write_embeddings(params.model, params.prompts, params.encode, machine, manifest["captions"],
                                     out, manifest.get("files", {}))
    show_notes(notes + watch.report().note("encode"))
    atomic.write_json(log, watch.report().to_json())


if __name__ == "__main__":
    main()
