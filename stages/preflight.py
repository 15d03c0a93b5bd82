"""Stage 1, preflight: probe the device, choose the precision, check every image before any model loads."""

from pathlib import Path

import click

from stages import PathOption, params_option, reported, show_notes
from yem import atomic
from yem.data.preflight import run_preflight
from yem.params import load_params


@click.command()
@params_option
@click.option("--hardware", type=PathOption, required=True, help="the hardware record: stable device facts")
@click.option("--images", type=PathOption, required=True, help="image manifest with content hashes (JSON)")
@click.option("--captions", type=PathOption, required=True, help="captions by sample id (JSON)")
@click.option("--log", type=PathOption, required=True, help="volatile readings, no stage depends on them")
def main(params_path: Path, hardware: Path, images: Path, captions: Path, log: Path) -> None:
    with reported():
        params = load_params(params_path)
        result = run_preflight(params.device, params.data, params.root)
    show_notes(result.notes)
    result.hardware.save(hardware)
    atomic.write_json(images, result.images)
    atomic.write_json(captions, result.captions)
    atomic.write_json(log, result.log)
    click.echo(f"preflight: {result.hardware.backend} {result.hardware.dtype}, "
               f"{len(result.images['samples'])} images", err=True)


if __name__ == "__main__":
    main()
