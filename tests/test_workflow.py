"""The Apple Silicon CI workflow cannot run here: check what can be checked without a Mac. It targets the
self-hosted Apple Silicon runner, runs the README's test command and the pipeline forced onto MPS with a DVC cache
outside the checkout, uploads the artefacts, and every shell and Python snippet in it parses."""

import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from ruamel.yaml import YAML

from tests.conftest import REPO
from yem.params import load_params, set_values

WORKFLOW = YAML(typ="safe").load((REPO / ".github" / "workflows" / "apple-silicon.yml").read_text())
JOB = WORKFLOW["jobs"]["mps"]
STEPS = JOB["steps"]
EXPRESSION = re.compile(r"\$\{\{.*?\}\}")


def runs() -> list[str]:
    return [step["run"] for step in STEPS if "run" in step]


def commands(script: str) -> list[list[str]]:
    """The simple commands of a step's script, split into words (heredoc bodies and comments dropped)."""
    found, heredoc = [], None
    for line in script.splitlines():
        if heredoc:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        if "<<'" in line:
            heredoc = line.split("<<'")[1].split("'")[0]
        words = shlex.split(line.split("<<")[0], comments=True)
        if words:
            found.append(words)
    return found


def step_index(predicate) -> int:
    matches = [i for i, step in enumerate(STEPS) if "run" in step and any(map(predicate, commands(step["run"])))]
    assert matches, "no step runs the command"
    return matches[0]


def readme_test_command() -> list[str]:
    """The README's set-up block names the test command (`make test    # ...`)."""
    readme = (REPO / "README.md").read_text()
    lines = [line.split("#")[0].split() for line in readme.splitlines() if re.match(r"^make test\b", line)]
    assert lines, "README.md no longer shows the test command"
    return lines[0]


def test_runs_on_the_self_hosted_apple_silicon_runner_only_for_trusted_code():
    assert JOB["runs-on"] == ["self-hosted", "macOS", "ARM64"]
    assert "head.repo.full_name == github.repository" in JOB["if"]  # fork pull requests never reach the Mac
    assert WORKFLOW["permissions"] == {"contents": "read"}
    assert {"push", "pull_request", "workflow_dispatch"} <= set(WORKFLOW["on"])


def test_has_a_timeout_and_one_run_per_branch_or_pull_request():
    assert 0 < JOB["timeout-minutes"] <= 120
    assert all(0 < step.get("timeout-minutes", 1) < JOB["timeout-minutes"] for step in STEPS)
    assert "github.ref" in WORKFLOW["concurrency"]["group"]
    assert "pull_request" in WORKFLOW["concurrency"]["cancel-in-progress"]


def test_nothing_phones_home():
    env = {**WORKFLOW.get("env", {}), **JOB.get("env", {})}
    assert env["DVC_NO_ANALYTICS"] == "1" and env["HF_HUB_OFFLINE"] == "1"


def test_installs_with_the_makefile_then_runs_the_readme_test_command():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z]+):", makefile, flags=re.M))
    make_calls = [words for script in runs() for words in commands(script) if words[0] == "make"]
    assert make_calls and all(words[1] in targets for words in make_calls)
    command = readme_test_command()
    tests = step_index(lambda words: words[:len(command)] == command)
    assert step_index(lambda words: words[:2] == ["make", "install"]) < tests


def test_runs_the_pipeline_on_mps_with_a_persistent_dvc_cache():
    pipeline = step_index(lambda words: words[:3] == ["dvc", "exp", "run"])
    assert pipeline > step_index(lambda words: words[:2] == ["make", "test"])
    script = commands(STEPS[pipeline]["run"])
    run = next(words for words in script if words[:3] == ["dvc", "exp", "run"])
    assert run[run.index("-S") + 1] == "device.backend=mps"
    cache = next(words for words in script if words[:4] == ["dvc", "cache", "dir", "--local"])
    assert cache[4].startswith("$STATE/")  # outside the checkout, which actions/checkout cleans
    assert script.index(cache) < script.index(run)
    assert step_index(lambda words: words[:2] == ["python", ".ci/check_mps_run.py"]) > pipeline


# What the stages write after a good run on a 16 GB M2 (the shape of each file as yem writes it)
GOOD_MAC_RUN = {
    "build/preflight.json": {"backend": "mps", "dtype": "float16", "chip": "Apple M2", "memory_budget_gib": 9.5,
                             "torch": "2.13.0", "diffusers": "0.42.0"},
    "metrics/train.json": {"backend": "mps", "dtype": "float16", "nonfinite_steps": 0, "rollbacks": 0,
                           "loss_scale_skipped_steps": 1, "thermal_source": "macos", "thermal_worst": "nominal",
                           "cpu_fallback_ops": "none", "peak_memory_gib": 0.61},
    **{f"logs/{stage}.json": {"cpu_fallback_ops": [], "cpu_fallback_seconds": {}, "cpu_fallback_sampled_s": 0.4,
                              "cpu_fallback_share": 0.0} for stage in ("encode", "latents", "render")},
}


def check_mps_run(folder, files: dict) -> subprocess.CompletedProcess:
    folder.mkdir()
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(content))
    return subprocess.run([sys.executable, str(REPO / ".ci" / "check_mps_run.py")], cwd=folder, capture_output=True,
                          text=True)


def test_the_mac_checks_pass_a_good_run_and_name_every_problem_of_a_bad_one(tmp_path):
    good = check_mps_run(tmp_path / "good", GOOD_MAC_RUN)
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.count("| ok |") == 6 and "FAILED" not in good.stdout
    bad = {**GOOD_MAC_RUN, "build/preflight.json": {**GOOD_MAC_RUN["build/preflight.json"], "dtype": "float32"},
           "metrics/train.json": {**GOOD_MAC_RUN["metrics/train.json"], "backend": "cpu", "nonfinite_steps": 2,
                                  "thermal_source": "none", "peak_memory_gib": 11.2},
           "logs/render.json": {"cpu_fallback_ops": ["aten::col2im"]}}
    failed = check_mps_run(tmp_path / "bad", bad)
    assert failed.returncode == 1
    errors = [line for line in failed.stderr.splitlines() if line.startswith("::error::")]
    named = [line.removeprefix("::error::MPS run: ").split(":")[0] for line in errors]
    assert named == ["backend", "precision", "CPU fallbacks", "heat", "non-finite", "memory"]
    assert "render: ['aten::col2im']" in failed.stderr
    missing = check_mps_run(tmp_path / "empty", {})
    assert missing.returncode == 1 and "No such file" in missing.stdout


def test_the_persistent_state_lives_outside_the_checkout():
    script = next(step["run"] for step in STEPS if "GITHUB_ENV" in step.get("run", ""))
    assert 'state="${YEM_CI_HOME:-$HOME/.cache/yem-ci}/$RUNNER_NAME"' in script
    assert "echo \"VENV=$state/" in script and "echo \"YEM_HOME=$state/" in script


def test_the_experiment_overrides_are_valid_params(tmp_path):
    pipeline = next(step["run"] for step in STEPS if "dvc exp run" in step.get("run", ""))
    run = next(words for words in commands(pipeline) if words[:3] == ["dvc", "exp", "run"])
    overrides = dict(run[i + 1].split("=", 1) for i, word in enumerate(run) if word == "-S")
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    set_values(params, overrides)  # raises if a key is unknown or a value invalid
    assert load_params(params).device.backend == "mps"


def test_uploads_the_artefacts_with_a_current_upload_artifact():
    uploads = [step for step in STEPS if step.get("uses", "").startswith("actions/upload-artifact@")]
    major = [int(step["uses"].split("@v")[1]) for step in uploads]
    assert uploads and min(major) >= 4  # v3 and older stopped working on github.com
    results = next(step for step in uploads if "dist/" in step["with"]["path"])
    assert {"dist/", "metrics/"} <= set(results["with"]["path"].split())
    assert results["with"]["if-no-files-found"] == "error"
    assert [step["uses"] for step in STEPS if "uses" in step][0].startswith("actions/checkout@v")


@pytest.mark.parametrize("index", [i for i, step in enumerate(STEPS) if "run" in step])
def test_every_script_parses(index):
    script = EXPRESSION.sub("x", STEPS[index]["run"])
    subprocess.run(["bash", "-n", "-c", script], check=True, capture_output=True)
    for body in re.findall(r"<<'EOF'\n(.*?)\nEOF", script, flags=re.S):
        compile(body, f"step {index} heredoc", "exec")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("python", [None, "python3.9"])
def test_make_with_only_an_old_python_stops_in_one_line_and_creates_nothing(tmp_path, python):
    """A stock Mac: the first python3 on PATH is 3.9 and there is no python3.1x (or PYTHON names one that is not
    there). `make demo` stops before it creates anything, in one line naming what it found and how to get one."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("cat", "cksum", "cut", "head"):  # what the Makefile's $(shell …) needs, and no python3.1x
        (tools / tool).symlink_to(shutil.which(tool))
    old = tools / "python3"
    old.write_text('#!/bin/sh\n[ "$1" = "--version" ] && { echo "Python 3.9.6"; exit 0; }\nexit 1\n')  # too old
    old.chmod(0o755)
    venv = tmp_path / "venv"
    command = [shutil.which("make"), "demo", f"VENV={venv}"] + ([f"PYTHON={python}"] if python else [])
    result = subprocess.run(command, cwd=REPO, env={"PATH": str(tools)}, capture_output=True, text=True)
    assert result.returncode != 0 and not venv.exists()
    (line,) = result.stderr.splitlines()
    got = "python3: Python 3.9.6, and no newer python3.1x on PATH" if python is None else "python3.9: not found"
    assert f"Python: yem needs 3.11 or newer (got {got}). Install one (brew install python@3.12" in line
