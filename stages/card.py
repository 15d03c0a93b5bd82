"""Stage 6, card: dist/ with the LoRA, its validation images, a loss curve and a Hugging Face model card."""

import json
from pathlib import Path

import click

from stages import reported
from yem import atomic
from yem.card import write_card
from yem.params import load_params

PathOption = click.Path(path_type=Path)


@click.command()
@click.option("--params", "params_path", type=PathOption, default="params.yaml", show_default=True)
@click.option("--lora", "lora_dir", type=PathOption, required=True)
@click.option("--metrics", "metrics_path", type=PathOption, required=True)
@click.option("--steps-log", type=PathOption, required=True)
@click.option("--validation", type=PathOption, required=True)
@click.option("--out", type=PathOption, required=True, help="the shareable folder (model card, LoRA, images)")
def main(params_path: Path, lora_dir: Path, metrics_path: Path, steps_log: Path, validation: Path,
         out: Path) -> None:
    with reported(), atomic.staged_dir(out) as staging:
        params = load_params(params_path)
        write_card(params.model, params.train, params.export, json.loads(metrics_path.read_text()), steps_log,
                   lora_dir, validation, staging)


if __name__ == "__main__":
    main()
