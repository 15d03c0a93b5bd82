"""Nothing lost: interrupted training (signal, kill -9, kill during a checkpoint write) resumes to exactly the
weights and loss log of an uninterrupted run; damaged checkpoints are skipped; non-finite steps are survived."""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, interrupt_after_step, split_bound
from yem.errors import StopRequested, TrainingStopped
from yem.model import lora_file
from yem.params import set_values
from yem.training import checkpoint
from yem.training.loop import run_training
from yem.training.runlog import RunLog


def settings(project, **changes):
    return dataclasses.replace(project[1].train, **{"steps": 12, "checkpoint_every": 4, **changes})


def train(project, out: str, **changes):
    root, params, hardware = project
    return run_training(params.model, settings(project, **changes), hardware, root / "latents", root / "embeds",
                        root / out, root)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / lora_file.WEIGHT_NAME))


def assert_same_run(a: Path, b: Path, rows_a: list[dict], rows_b: list[dict]) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:2]}"
    assert [(r["step"], r["loss"], r["lr"]) for r in rows_a] == [(r["step"], r["loss"], r["lr"]) for r in rows_b]


@pytest.fixture(scope="module")
def reference(cached_project):
    """An uninterrupted 12-step run."""
    return train(cached_project, "reference")


def test_sigint_mid_run_then_rerun_matches_an_uninterrupted_run(cached_project, reference, monkeypatch):
    import yem.training.loop
    import yem.training.setup
    import yem.training.state

    original = interrupt_after_step(monkeypatch, 6)
    with pytest.raises(StopRequested, match=r"stopped on request after step 7/12.*Run the same command again"):
        train(cached_project, "interrupted")
    monkeypatch.setattr(yem.training.loop, "update", original)
    resumed = train(cached_project, "interrupted")
    assert resumed.resumed_from == 7
    root = cached_project[0]
    assert_same_run(root / "reference", root / "interrupted", reference.rows, resumed.rows)


CHILD = """
import sys, time, dataclasses
sys.path.insert(0, {repo!r})
from tests.conftest import configure_environment
import yem.training.loop
from yem.hardware.record import Hardware
from yem.params import load_params
slow = yem.training.loop.update
def update(run, step):  # slower steps, so the parent can catch the run in the middle
    time.sleep({delay})
    return slow(run, step)
yem.training.loop.update = update
{inject}
root = __import__("pathlib").Path({root!r})
params = load_params(root / "params.yaml")
hardware = Hardware.load(root / "hardware.json")
yem.training.loop.run_training(params.model, params.train, hardware, root / "latents", root / "embeds",
                               root / {out!r}, root)
"""


def child(project, out: str, steps: int, delay: float, inject: str = "") -> subprocess.Popen:
    """Train in a separate process with the project's params.yaml (written from `settings`)."""
    root, params, hardware = project
    hardware.save(root / "hardware.json")
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    set_values(root / "params.yaml", {"train.steps": steps, "train.checkpoint_every": 4,
                                      "data.instance_dir": "instance", "data.resolution": 64,
                                      "data.random_flip": True})
    code = CHILD.format(repo=str(REPO), root=str(root), out=out, delay=delay, inject=textwrap.dedent(inject))
    return subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_checkpoint(root: Path, at_least: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [int(p.name[5:]) for p in (root / ".yem/checkpoints").glob("*/step-*")]
        if steps and max(steps) >= at_least:
            return
        assert process.poll() is None, f"training ended early:\n{process.stderr.read()}"
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def test_kill_9_then_rerun_matches_an_uninterrupted_run(cached_project, reference):
    root = cached_project[0]
    process = child(cached_project, "killed", steps=12, delay=0.15)
    wait_for_checkpoint(root, 4, process)
    time.sleep(random.uniform(0, 0.3))  # somewhere in the steps after the checkpoint
    process.kill()
    process.wait()
    resumed = train(cached_project, "killed")
    assert 4 <= resumed.resumed_from < 12
    assert_same_run(root / "reference", root / "killed", reference.rows, resumed.rows)


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_checkpoint(cached_project, reference):
    """The child dies (SIGKILL) halfway through writing the second checkpoint's optimizer state."""
    inject = """
    import os, signal, yem.training.checkpoint
    real_save = yem.training.checkpoint.torch.save
    def dying_save(obj, path, *a, **k):
        if "step-00000008" in str(path):
            with open(path, "wb") as f:
                f.write(b"partial")
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, path, *a, **k)
    yem.training.checkpoint.torch.save = dying_save
    """
    root = cached_project[0]
    process = child(cached_project, "killed-in-write", steps=12, delay=0.0, inject=inject)
    process.wait(timeout=120)
    assert process.returncode == -signal.SIGKILL
    (run_dir,) = (root / ".yem/checkpoints").iterdir()
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-00000004"]  # no half checkpoint visible
    assert checkpoint.load_latest(run_dir).step == 4
    resumed = train(cached_project, "killed-in-write")
    assert resumed.resumed_from == 4
    assert_same_run(root / "reference", root / "killed-in-write", reference.rows, resumed.rows)
    assert not run_dir.exists()  # a finished run discards its checkpoints, temporaries included


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_to_the_train_stage_exits_cleanly_and_the_rerun_completes(cached_project, reference, signum):
    root, out = cached_project[0], f"staged-{signum}"
    stage = ["-m", "stages.train", "--params", str(root / "params.yaml"), "--hardware", str(root / "hardware.json"),
             "--latents", str(root / "latents"), "--embeds", str(root / "embeds"), "--out", str(root / out),
             "--metrics", str(root / "metrics.json"), "--steps-log", str(root / "steps.tsv")]
    process = child(cached_project, "unused", steps=12, delay=0)  # writes params.yaml + hardware.json only
    process.kill()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    slow = ("import runpy, sys, time, yem.training.loop as t; u = t.update; "
            "t.update = lambda run, step: (time.sleep(0.15), u(run, step))[1]; "
            "sys.argv = ['stages.train', *sys.argv[1:]]; runpy.run_module('stages.train', run_name='__main__')")
    stage_run = subprocess.Popen([sys.executable, "-c", slow, *stage[2:]], cwd=root, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_checkpoint(root, 4, stage_run)
    time.sleep(random.uniform(0, 0.4))
    stage_run.send_signal(signum)
    _, stderr = stage_run.communicate(timeout=120)
    assert stage_run.returncode == StopRequested.EXIT_STATUS, stderr
    assert "Traceback" not in stderr and "Error" not in stderr  # a stop on request is not a failure
    assert "train: stopped on request after step" in stderr and "to resume" in stderr
    assert not (root / out).exists()  # no output until training is complete
    finished = subprocess.run([sys.executable, *stage], cwd=root, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    metrics = json.loads((root / "metrics.json").read_text())
    assert 4 <= metrics["resumed_from_step"] < 12
    expected = weights(root / "reference")
    assert {k: torch.equal(v, expected[k]) for k, v in weights(root / out).items()} == {k: True for k in expected}


def test_damaged_checkpoints_are_skipped_for_the_previous_good_one(tmp_path):
    def state(step: int) -> checkpoint.TrainingState:
        return checkpoint.TrainingState(step=step, adapter={"w": torch.full((3,), float(step))}, optimizer={},
                                        scheduler={}, scaler={}, log=RunLog(dtype="float32", step=step),
                                        rng=checkpoint.capture_rng())

    for step in (2, 4, 6, 8):
        checkpoint.save(tmp_path, state(step), keep=4)
    (tmp_path / "step-00000008" / "adapter.safetensors").write_bytes(b"not a tensor file")  # corrupt
    with open(tmp_path / "step-00000006" / "optimizer.pt", "r+b") as f:  # truncated
        f.truncate(10)
    (tmp_path / "step-00000004" / checkpoint.MANIFEST).unlink()  # incomplete
    (tmp_path / ".step-00000010.tmp").mkdir()  # a write that never finished
    with pytest.warns(UserWarning) as warned:
        latest = checkpoint.load_latest(tmp_path)
    assert latest.step == 2 and torch.equal(latest.adapter["w"], torch.full((3,), 2.0))
    assert len(warned) == 3 and "step-00000008" in str(warned[0].message)


def test_checkpoints_keep_only_the_newest(tmp_path):
    for step in range(1, 6):
        state = checkpoint.TrainingState(step, {"w": torch.zeros(1)}, {}, {}, {}, RunLog(dtype="float32"), {})
        checkpoint.save(tmp_path, state, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]


def nan_at(monkeypatch, bad_steps):
    """Make the loss NaN (so every gradient is NaN) at the given steps; `bad_steps(step, calls)` decides."""
    import yem.training.loop
    import yem.training.setup
    import yem.training.state

    update, loss, calls, current = yem.training.loop.update, yem.training.loop.batch_loss, {"n": 0}, {}

    def tracking_update(run, step):
        current["step"] = step
        return update(run, step)

    def poisoned_loss(*args, **kwargs):
        value = loss(*args, **kwargs)
        if bad_steps(current["step"], calls):
            calls["n"] += 1
            return value * float("nan")
        return value

    monkeypatch.setattr(yem.training.loop, "update", tracking_update)
    monkeypatch.setattr(yem.training.loop, "batch_loss", poisoned_loss)


def test_isolated_nonfinite_steps_are_skipped_and_counted(cached_project, monkeypatch):
    nan_at(monkeypatch, lambda step, calls: step in (2, 9))
    result = train(cached_project, "skipped")
    metrics = result.metrics()
    assert metrics["nonfinite_steps"] == 2 and metrics["rollbacks"] == 0
    assert all(torch.isfinite(w).all() for w in weights(cached_project[0] / "skipped").values())


def test_a_run_of_nonfinite_steps_rolls_back_with_a_lower_learning_rate(cached_project, monkeypatch):
    nan_at(monkeypatch, lambda step, calls: step >= 5 and calls["n"] < 3)  # 3 in a row, then healthy
    result = train(cached_project, "rolled-back")
    metrics = result.metrics()
    assert metrics["rollbacks"] == 1 and metrics["learning_rate_scale"] == 0.5
    assert metrics["nonfinite_steps"] == 3
    assert [r["step"] for r in result.rows] == list(range(1, 13))  # the rolled-back steps were redone
    assert result.rows[-1]["lr"] == pytest.approx(0.5 * settings(cached_project).learning_rate)


def test_nonfinite_policy_stop_gives_advice_and_saves_nothing(cached_project, monkeypatch):
    nan_at(monkeypatch, lambda step, calls: step >= 5)
    with pytest.raises(TrainingStopped, match=r"3 non-finite steps in a row .* Lower train.learning_rate"):
        train(cached_project, "stopped", on_nonfinite="stop")
    assert not (cached_project[0] / "stopped").exists()


class ReplayedSensor:
    """Thermal states in the order a machine reported them; the last one repeats."""

    def __init__(self, *states):
        self.states = list(states)

    def read(self):
        from yem.hardware.thermal.reading import Reading

        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return Reading(state=state, source="replay", detail=f"replayed {state.label}")


def test_heat_pauses_training_without_changing_its_result(cached_project, reference, monkeypatch):
    import yem.training.loop
    import yem.training.setup
    import yem.training.state
    from yem.hardware.thermal.reading import ThermalState as T
    from yem.params import ThermalParams

    sensor = ReplayedSensor(T.NOMINAL, T.SERIOUS, T.SERIOUS, T.FAIR, T.NOMINAL)  # hot after the first window
    monkeypatch.setattr(yem.training.setup.sensor, "detect", lambda backend: sensor)
    monkeypatch.setattr(yem.training.state.time, "sleep", lambda seconds: None)
    root, params, hardware = cached_project
    result = run_training(params.model, settings(cached_project), hardware, root / "latents", root / "embeds",
                          root / "paused", root, ThermalParams(policy="pause", max_pause_s=60))
    metrics = result.metrics()
    assert metrics["thermal_pauses"] == 1 and metrics["thermal_worst"] == "serious"
    assert [r["thermal"] for r in result.rows][:8] == [0] * 4 + [2] * 4
    assert_same_run(root / "reference", root / "paused", reference.rows, result.rows)


def test_critical_heat_stops_with_a_checkpoint_and_the_rerun_resumes(cached_project, reference, monkeypatch):
    import yem.training.loop
    import yem.training.setup
    import yem.training.state
    from yem.hardware.thermal.reading import ThermalState as T
    from yem.params import ThermalParams

    root, params, hardware = cached_project
    heat = ThermalParams(policy="pause", max_pause_s=60)

    def attempt(sensor):
        monkeypatch.setattr(yem.training.setup.sensor, "detect", lambda backend: sensor)
        return run_training(params.model, settings(cached_project), hardware, root / "latents", root / "embeds",
                            root / "critical", root, heat)

    with pytest.raises(TrainingStopped, match=r"stopped for heat after step 8/12.*rerun `dvc repro`"):
        attempt(ReplayedSensor(T.NOMINAL, T.CRITICAL))
    resumed = attempt(ReplayedSensor(T.NOMINAL))
    assert resumed.resumed_from == 8
    assert_same_run(root / "reference", root / "critical", reference.rows, resumed.rows)


def test_batch_size_auto_plans_then_backs_off_on_out_of_memory_with_the_same_result(cached_project, monkeypatch):
    """auto plans batch 4 (the whole effective batch fits); a MemoryError at step 6 halves it to 2 × 2: the step
    covers the same samples with the same noise, so the weights match a fixed 4 × 1 run."""
    import yem.training.loop
    import yem.training.setup
    import yem.training.state

    fixed = train(cached_project, "batch-fixed", batch_size=4, gradient_accumulation=1, gradient_checkpointing=False)
    update = yem.training.loop.update

    def update_running_out(run, step):
        if step == 5 and run.plan.batch_size == 4:
            raise MemoryError("simulated: the device is full")
        return update(run, step)

    monkeypatch.setattr(yem.training.loop, "update", update_running_out)
    auto = train(cached_project, "batch-auto", batch_size="auto", effective_batch_size=4, gradient_checkpointing=False)
    metrics = auto.metrics()
    assert (metrics["batch_size"], metrics["gradient_accumulation"], metrics["memory_backoffs"]) == (2, 2, 1)
    assert "out of memory at batch 4 × 1" in metrics["batch_plan"]
    a, b = weights(cached_project[0] / "batch-fixed"), weights(cached_project[0] / "batch-auto")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < split_bound(cached_project[2].dtype, 1e-5)
    assert fixed.metrics()["effective_batch_size"] == metrics["effective_batch_size"] == 4


def test_growing_swap_backs_the_batch_off_like_an_out_of_memory_error(cached_project, monkeypatch):
    """Unified memory pages out before it fails: swap rising every window is treated as memory pressure."""
    import dataclasses as dc

    import yem.training.loop
    import yem.training.setup
    import yem.training.state

    real_read, grown = yem.training.loop.memory.read, iter(range(1, 100))

    def swapping(backend, source=None):
        return dc.replace(real_read(backend), swap_used=next(grown) * 300 * 2**20)  # +300 MiB per window

    monkeypatch.setattr(yem.training.loop.memory, "read", swapping)
    result = train(cached_project, "swap", batch_size=4, gradient_accumulation=1, gradient_checkpointing=False)
    metrics = result.metrics()
    assert metrics["memory_backoffs"] >= 1 and metrics["batch_size"] < 4
    assert metrics["effective_batch_size"] == 4


def test_batch_auto_on_two_memory_budgets_trains_the_same_lora(cached_project, monkeypatch):
    """The effective batch comes from params: a large budget runs it as 4 × 1, a small one as 2 × 2 (or 1 × 4);
    the LoRA is the same within float rounding. Memory is faked: a step's peak is 1 GiB per image."""
    import yem.training.autobatch
    from yem.data import trainset

    sizes, real = [], trainset.largest_batch

    def recording(data, size, *args):
        sizes.append(size)
        return real(data, size, *args)

    monkeypatch.setattr(yem.training.autobatch.trainset, "largest_batch", recording)
    monkeypatch.setattr(yem.training.autobatch.peaks, "peak_bytes", lambda backend: sizes[-1] * 2**30)
    root, params, hardware = cached_project
    plans = {}
    for name, gib in (("roomy", 16.0), ("tight", 2.5)):
        chosen = settings(cached_project, batch_size="auto", effective_batch_size=4, gradient_checkpointing=False,
                          steps=6)
        result = run_training(params.model, chosen, dataclasses.replace(hardware, memory_budget_gib=gib),
                              root / "latents", root / "embeds", root / f"budget-{name}", root)
        plans[name] = (result.batch_size, result.gradient_accumulation)
    assert plans == {"roomy": (4, 1), "tight": (2, 2)}
    a, b = weights(root / "budget-roomy"), weights(root / "budget-tight")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < split_bound(hardware.dtype, 1e-5)
