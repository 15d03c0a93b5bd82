"""yem, dvc and the stages behave as one program: a stop signal sent to yem's pid alone (as kill, an IDE's stop
button or a process manager send it) saves a checkpoint and leaves nothing running, the rerun says where it
resumes; a failed one-liner leaves params.yaml as it was; `yem reset` brings the demo back; `make demo` says
where the results are, without setuptools' banner."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from tests.conftest import REPO, make_project
from yem.cli import main as cli
from yem.params import load_params, set_values
from yem.pipeline import group, options
from yem.training.stop import stop_requests

STEPS = 1000  # never reached: each run is stopped a few checkpoints in


def pipeline_env() -> dict[str, str]:
    return {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}


def checkpoint_steps(project: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in project.glob(".yem/checkpoints/*/step-*") if p.is_dir())


def wait_until(condition, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"yem ended early ({process.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def stoppable(tmp_path_factory, tiny_model_dir) -> Path:
    project = make_project(tmp_path_factory.mktemp("stops") / "project")
    set_values(project / "params.yaml", {"data.resolution": 64, "train.checkpoint_every": 5})
    return project


@pytest.mark.pipeline
def test_a_stop_signal_to_yem_alone_checkpoints_leaves_nothing_running_and_the_rerun_resumes(stoppable, tmp_path):
    """kill -INT, kill -TERM, kill -HUP of yem's pid: before, INT and TERM left dvc and the stage running as orphans
    (the next run met a busy lock) and HUP killed them without a checkpoint."""
    stopped_at = 0
    for attempt, signum in enumerate([signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGINT]):
        log = tmp_path / f"run{attempt}.err"
        with open(log, "w") as err:
            yem = subprocess.Popen([sys.executable, "-m", "yem", "train", "--steps", str(STEPS)], cwd=stoppable,
                                   env=pipeline_env(), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        wait_until(lambda after=stopped_at: any(step > after for step in checkpoint_steps(stoppable)), yem, log)
        groups = {os.getpgid(p.pid) for p in psutil.Process(yem.pid).children(recursive=True)}
        assert groups and yem.pid not in groups  # dvc and the stage run in a group of their own
        os.kill(yem.pid, signum)  # yem's pid alone
        assert yem.wait(timeout=120) == 128 + signum
        text = log.read_text()
        if attempt:  # the rerun said where it resumed
            assert re.search(rf"train: resuming from step {stopped_at} of {STEPS} \(checkpoint saved "
                             rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\)\n", text), text[-2000:]
        stops = re.findall(rf"train: stopped on request after step (\d+)/{STEPS}; checkpoint saved in .*\. Run the "
                           rf"same command again to resume\.\n", text)
        assert len(stops) == 1, text[-2000:]
        assert not re.search(r"Error|ERROR|Traceback|failed|Aborted", text), text[-2000:]  # nothing but that line
        stopped_at = int(stops[0])
        assert stopped_at in checkpoint_steps(stoppable)  # the checkpoint of the step it stopped at
        assert not any(group.alive(g) for g in groups)  # no orphan
        assert json.loads((stoppable / ".dvc/tmp/rwlock").read_text()) == {}  # dvc released its locks


def test_a_child_of_the_group_that_outlives_it_is_not_left_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(group, "LINGER_S", 0.5)
    pid_file = tmp_path / "grandchild"
    spawn = (f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             f"open({str(pid_file)!r}, 'w').write(str(p.pid))")
    finished = group.run_as_one([sys.executable, "-c", spawn])
    assert finished == group.Finished(0, None)
    grandchild = int(pid_file.read_text())
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE


def test_the_train_stage_stops_on_sighup_unless_it_was_started_with_sighup_ignored():
    with stop_requests() as request:
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.01)  # the handler runs between bytecodes
        assert request.signal == "SIGHUP"
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with stop_requests() as request:
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.01)
            assert not request
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.fixture
def project(tmp_path) -> Path:
    """A project folder for commands that stop before any stage runs."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "photos").mkdir()
    return tmp_path


def one_liner(*options: str):
    return CliRunner().invoke(cli, ["train", *options])  # in the project folder, as people run it


@pytest.mark.parametrize(("given", "expected"), [
    (["--data", "/nope/photos"], "Error: --data (data.instance_dir): no such folder (got /nope/photos). Give the "
                                 "folder that holds your photos.\n"),
    (["--data", "photos", "--resolution", "1000"], "Error: params.yaml data.resolution: must be a multiple of 16 "
                                                   "(latent ×8, patch ×2) (got 1000). Use 992 or 1008.\n"),
    (["--model", "./models/sd3"], "Error: model.id: folder ./models/sd3 does not exist (nor is it a Hub id like "
                                  "namespace/name). Fix the path, or use a hub id such as "
                                  "stabilityai/stable-diffusion-3-medium-diffusers.\n"),
])
def test_bad_options_are_one_line_naming_the_key_and_change_nothing(project, monkeypatch, given, expected):
    monkeypatch.chdir(project)
    before = (project / "params.yaml").read_bytes()
    result = one_liner(*given)
    assert result.exit_code == 1 and result.output == expected
    assert (project / "params.yaml").read_bytes() == before
    assert [p.name for p in project.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_reset_brings_the_demo_back_byte_for_byte_after_a_real_model(project, tiny_model_dir):
    """Trying a real model (here a local diffusers folder) set ten keys; `yem reset` puts the shipped file back."""
    real = project / "sd3"
    shutil.copytree(tiny_model_dir, real)
    tried = {"model.id": str(real), "data.instance_dir": str(project / "photos"), "train.rank": 16}
    edits = options.updates(tried, "tiny", project)
    assert edits["model.id"] == "sd3" and edits["train.learning_rate"] == 1e-4 and edits["train.alpha"] is None
    set_values(project / "params.yaml", edits)
    assert (project / "params.yaml").read_bytes() != (REPO / "params.yaml").read_bytes()
    result = CliRunner().invoke(cli, ["reset", "--params", str(project / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert "params.yaml model.id: sd3 → tiny" in result.output
    assert (project / "params.yaml").read_bytes() == (REPO / "params.yaml").read_bytes()


def test_the_demo_yem_reset_writes_is_the_shipped_params_yaml():
    shipped = load_params(REPO / "params.yaml")
    for dotted, value in options.DEMO.items():
        section, _, key = dotted.partition(".")
        assert getattr(getattr(shipped, section), key) == value, dotted


def make_dry_run(target: str) -> str:
    found = subprocess.run(["make", "-n", target, "VENV=/v"], cwd=REPO, capture_output=True, text=True, check=True)
    return found.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_runs_the_one_liner_which_says_where_the_results_are_and_pip_shows_no_banner():
    demo = make_dry_run("demo")
    assert re.search(r"/v/bin/python -m yem train\s*$", demo, re.MULTILINE), demo
    installs = [line for line in make_dry_run("install").splitlines() if "pip install" in line and "-e " in line]
    assert installs and all("PYTHONWARNINGS='ignore:Editable installation'" in line for line in installs), installs
