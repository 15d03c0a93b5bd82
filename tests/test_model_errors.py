"""A base model that cannot be used gets one line naming model.id and what to do: not downloaded (offline), a
path that does not exist, a folder that is not an SD3 pipeline or is incomplete, a gated, unknown or mis-pinned
hub model. No network: HF_HUB_OFFLINE=1 (conftest), and the Hub's refusals are raised where the libraries call
huggingface_hub, so diffusers and transformers wrap them exactly as they do for real."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

from tests.corpus import latents_cached, snapshot
from yem.errors import ModelError
from yem.model import sd3
from yem.params import ModelParams, set_values

try:  # the HTTP client huggingface_hub raises with: httpx2 from hub 2.0, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx

SD3 = "stabilityai/stable-diffusion-3-medium-diffusers"
LOADERS = {
    "vae": lambda model: sd3.load_vae(model, "cpu"),
    "text encoder": lambda model: sd3.load_text_encoder(model, "clip_l", torch.float32, "cpu"),
    "transformer config": sd3.transformer_config,
    "scheduler": sd3.load_training_scheduler,
    "pipeline": lambda model: sd3.load_render_pipeline(model, torch.float32, "cpu"),
}


def model_error(model_id: str, load=LOADERS["vae"], revision: str | None = None) -> str:
    with pytest.raises(ModelError) as caught:
        load(ModelParams(model_id, revision))
    return str(caught.value)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_a_hub_model_that_is_not_downloaded_says_how_to_get_it(loader):
    assert model_error("yem-tests/never-downloaded", LOADERS[loader]) == (
        "model.id 'yem-tests/never-downloaded': not downloaded, and the Hub cannot be reached (offline). Log in and "
        "download it while online (`hf auth login`, then `hf download yem-tests/never-downloaded`), or set model.id "
        "to a local folder.")


@pytest.mark.parametrize("model_id", ["models/sd3/medium", "my models/sd3", "./sd3", "~/no-such-yem-model"])
def test_a_path_that_does_not_exist_is_named(model_id):
    assert model_error(model_id) == (
        f"model.id: folder {model_id} does not exist (nor is it a Hub id like namespace/name). Fix the path, or use "
        f"a hub id such as {SD3}.")


def test_folders_that_are_not_sd3_pipelines_are_refused_before_any_weights_load(tmp_path):
    empty, sdxl, broken, listed = (tmp_path / name for name in ("empty", "sdxl", "broken", "listed"))
    for folder in (empty, sdxl, broken, listed):
        folder.mkdir()
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (broken / "model_index.json").write_text("{not json")
    (listed / "model_index.json").write_text("[1, 2]")
    assert model_error(str(empty)) == (
        f"model.id: {empty} is not a diffusers pipeline folder (got no model_index.json in it). Point it at a folder "
        f"saved by StableDiffusion3Pipeline, e.g. `hf download {SD3} --local-dir <folder>`.")
    assert model_error(str(sdxl)) == (
        f"model.id: {sdxl} is not an SD3 pipeline (got StableDiffusionXLPipeline in model_index.json). Point it at an "
        f"SD3 or SD3.5 diffusers folder, e.g. a download of {SD3}.")
    for folder in (broken, listed):
        message = model_error(str(folder))
        assert message.startswith(f"model.id: {folder / 'model_index.json'} is unreadable or not a JSON object (got ")
        assert message.endswith("). Download the model again.")


@pytest.fixture
def tiny_copy(tmp_path, tiny_model_dir) -> Path:
    copy = tmp_path / "tiny copy"
    shutil.copytree(tiny_model_dir, copy)
    return copy


def test_an_incomplete_or_corrupt_pipeline_folder_names_the_part(tiny_copy):
    shutil.rmtree(tiny_copy / "vae")
    message = model_error(str(tiny_copy))
    assert message.startswith(f"model.id {str(tiny_copy)!r}: cannot load its vae (got ")
    assert message.endswith("). The model is incomplete or corrupt: download it again, or point model.id at a "
                            "complete SD3 diffusers folder.")
    weights = tiny_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # an interrupted copy
    message = model_error(str(tiny_copy), lambda model: sd3.load_transformer(model, torch.float32, "cpu"))
    assert message.startswith(f"model.id {str(tiny_copy)!r}: cannot load its transformer (got ")


def hub_refusal(kind: type, status: int, message: str):
    response = httpx.Response(status, request=httpx.Request("GET", f"https://huggingface.co/{SD3}/resolve/main/x"))
    return kind(message, response=response)


@pytest.fixture
def hub_refuses(monkeypatch):
    """Make the Hub refuse every download with `error`, raised where diffusers and transformers call it."""
    import diffusers.configuration_utils
    import diffusers.utils.hub_utils
    import transformers.utils.hub

    def install(error: Exception) -> None:
        def download(*args, **kwargs):
            raise error

        for module in (diffusers.configuration_utils, diffusers.utils.hub_utils, transformers.utils.hub):
            monkeypatch.setattr(module, "hf_hub_download", download)

    return install


@pytest.mark.parametrize("loader", ["vae", "text encoder", "transformer config", "scheduler"])
def test_a_gated_model_without_a_token_says_to_accept_the_license_and_log_in(hub_refuses, loader):
    hub_refuses(hub_refusal(GatedRepoError, 403, f"Cannot access gated repo for url https://huggingface.co/{SD3}."))
    message = model_error(SD3, LOADERS[loader])
    assert message.startswith(f"model.id '{SD3}': gated model, and this machine has no access (got Cannot access ")
    assert message.endswith(f"Accept its license at https://huggingface.co/{SD3}, then log in (`hf auth login`) or "
                            f"set HF_TOKEN.")


def test_an_unknown_model_and_an_unknown_revision(hub_refuses):
    hub_refuses(hub_refusal(RepositoryNotFoundError, 404, "Repository Not Found"))
    assert model_error("yem-tests/no-such-model") == (
        "model.id 'yem-tests/no-such-model': no such model on the Hub, or it is private. Check the id, log in "
        "(`hf auth login`), or set model.id to a local folder.")
    hub_refuses(hub_refusal(RevisionNotFoundError, 404, "Revision Not Found"))
    assert model_error(SD3, revision="v9") == (
        f"model.id '{SD3}' (model.revision v9): no such revision. Set model.revision to a branch, tag or commit of "
        f"that repository.")


def test_the_latents_stage_stops_in_one_line_and_keeps_its_previous_cache(tmp_path, tiny_model_dir):
    from stages.latents import main

    project, args, before = latents_cached(tmp_path / "project")
    set_values(project / "params.yaml", {"model.id": "yem-tests/never-downloaded"})
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1].startswith("Error: model.id 'yem-tests/never-downloaded': not downloaded")
    assert snapshot(project / "build") == before


OFFLINE_LOAD = """
import sys
from yem.model import sd3
from yem.params import ModelParams
try:
    sd3.load_vae(ModelParams("yem-tests/never-downloaded", None), "cpu")
except sd3.ModelError as e:
    sys.exit(str(e))
"""


def test_an_unreachable_hub_is_one_line_without_retries_even_without_hf_hub_offline(tmp_path):
    """Before, each file was retried five times over about a minute, two lines each, before the message."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path))  # port 9: nothing listens
    done = subprocess.run([sys.executable, "-c", OFFLINE_LOAD], env=env, capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == ("model.id 'yem-tests/never-downloaded': not downloaded, and the Hub cannot be reached "
                           "(offline). Log in and download it while online (`hf auth login`, then `hf download "
                           "yem-tests/never-downloaded`), or set model.id to a local folder.\n")


def test_the_hub_check_honours_hf_hub_offline_the_endpoint_and_a_proxy(monkeypatch):
    from huggingface_hub import constants

    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    try:
        for offline, endpoint, proxy, reachable in [(True, f"http://127.0.0.1:{port}", None, False),
                                                    (False, f"http://127.0.0.1:{port}", None, True),
                                                    (False, "http://127.0.0.1:9", None, False),
                                                    (False, "https://hub.invalid", f"http://127.0.0.1:{port}", True)]:
            monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
            monkeypatch.setattr(constants, "ENDPOINT", endpoint)
            for name in ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
                monkeypatch.delenv(name, raising=False)
            if proxy:
                monkeypatch.setenv("https_proxy", proxy)
            sd3.hub_reachable.cache_clear()
            assert sd3.hub_reachable() is reachable, (offline, endpoint, proxy)
    finally:
        listening.close()
        sd3.hub_reachable.cache_clear()
