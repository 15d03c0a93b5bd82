"""Stage 6, card: dist/ with the LoRA in each export format, its validation images, a loss curve and a model card."""

from pathlib import Path

import click

from stages import PathOption, params_option, reported
from yem import atomic
from yem.outputs.card import Results, write_card
from yem.params import load_params


@click.command()
@params_option
@click.option("--lora", "lora_dir", type=PathOption, required=True)
@click.option("--metrics", "metrics_path", type=PathOption, required=True)
@click.option("--steps-log", type=PathOption, required=True)
@click.option("--validation", type=PathOption, required=True)
@click.option("--images", type=PathOption, required=True, help="the image manifest (for the dataset size)")
@click.option("--out", type=PathOption, required=True, help="the shareable folder (model card, LoRA, images)")
def main(params_path: Path, lora_dir: Path, metrics_path: Path, steps_log: Path, validation: Path, images: Path,
         out: Path) -> None:
    with reported(), atomic.staged_dir(out) as staging:
        params = load_params(params_path)
        results = Results.load(lora_dir, validation, metrics_path, steps_log, images)
        write_card(params.model, params.train, params.export, results, staging)


if __name__ == "__main__":
    main()
