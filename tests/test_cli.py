"""The one-liner's params: what `yem train` writes into params.yaml before it runs the pipeline (run here without
DVC): a real model's native resolution, alpha that follows --rank, validation prompts that follow --prompt."""

import shutil

import pytest
from click.testing import CliRunner

from tests.conftest import REPO
from yem import cli
from yem.params import load_params
from yem.pipeline import repro


@pytest.fixture
def project(tmp_path, monkeypatch):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.setattr(repro, "run", lambda project, env: repro.Outcome(repro.DONE, said=False))
    return tmp_path / "params.yaml"


def one_liner(params, *options):
    result = CliRunner().invoke(cli.main, ["train", "--params", str(params), *options])
    assert result.exit_code == 0, result.output
    return load_params(params)


def test_a_real_model_without_resolution_trains_at_its_native_resolution(project):
    loaded = one_liner(project, "--model", "stabilityai/stable-diffusion-3.5-medium")
    assert loaded.data.resolution == 1024  # sample_size 128 × the VAE's 8, from yem's table of SD3 models
    assert one_liner(project, "--model", "someone/unknown-sd3-finetune").data.resolution == 1024
    assert one_liner(project, "--model", "tiny").data.resolution == 128  # back to the demo: the demo's settings
    assert one_liner(project, "--model", "stabilityai/stable-diffusion-3.5-medium",
                     "--resolution", "512").data.resolution == 512


def test_the_native_resolution_comes_from_a_local_models_config(project, tiny_model_dir):
    assert one_liner(project, "--model", str(tiny_model_dir)).data.resolution == 128  # sample_size 16 × 8


def test_rank_without_alpha_lets_alpha_follow_the_rank(project):
    loaded = one_liner(project, "--rank", "8")
    assert loaded.train.alpha is None and loaded.train.lora_alpha == 8.0
    assert "alpha: null" in project.read_text()
    assert one_liner(project, "--rank", "8", "--alpha", "4").train.lora_alpha == 4.0


def test_validation_prompts_follow_a_new_prompt_unless_given(project):
    loaded = one_liner(project, "--prompt", "a photo of zwx cat")
    assert loaded.prompts.validation is None
    assert loaded.prompts.validation_prompts() == ["a photo of zwx cat", "a photo of zwx cat, on a beach at sunset"]
    given = one_liner(project, "--prompt", "a photo of zwx cat", "--validation-prompt", "zwx cat asleep")
    assert given.prompts.validation_prompts() == ["zwx cat asleep"]
