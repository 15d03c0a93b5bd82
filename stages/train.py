"""Stage 4, train: the LoRA on cached latents and embeddings; checkpointed, resumes after an interruption."""

import sys
from pathlib import Path

import click

from stages import PathOption, hardware_option, params_option, reported, show_notes
from yem.hardware import launch
from yem.hardware.record import Hardware
from yem.params import load_params
from yem.training import metrics
from yem.training.loop import run_training


@click.command()
@params_option
@hardware_option
@click.option("--latents", type=PathOption, required=True)
@click.option("--embeds", type=PathOption, required=True)
@click.option("--out", type=PathOption, required=True, help="folder for pytorch_lora_weights.safetensors")
@click.option("--metrics", "metrics_path", type=PathOption, required=True, help="summary metrics (JSON)")
@click.option("--steps-log", type=PathOption, required=True, help="per-step log for dvc plots (TSV)")
def main(params_path: Path, hardware: Path, latents: Path, embeds: Path, out: Path, metrics_path: Path,
         steps_log: Path) -> None:
    with reported():
        params = load_params(params_path)
        machine = Hardware.load(hardware)
        processes = launch.process_count(params.train.devices, machine.backend)
        if processes > 1 and not launch.inside_launch():  # DDP: the same command in every process
            sys.exit(launch.relaunch("stages.train", sys.argv[1:], processes))
        result = run_training(params.model, params.train, machine, latents, embeds, out, params.root,
                              params.thermal)
    if result is None:
        return  # not the main process: it writes nothing
    metrics.write_json(metrics_path, result.metrics())
    metrics.write_tsv(steps_log, result.rows)
    show_notes(result.warnings)


if __name__ == "__main__":
    main()
