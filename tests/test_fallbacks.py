"""CPU fallbacks are recorded from the start of every torch stage, with the time they took where torch's profiler
can tell. A Linux CPU has no MPS, so the fallback is replayed: a custom op that, like torch's CPU fallback
(aten/src/ATen/native/CPUFallback.cpp), first copies its inputs with `aten::_to_cpu`, and torch's own warning."""

import dataclasses
import time
import warnings

import pytest
import torch

from yem.hardware import fallbacks

WARNING = ("The operator '{}' is not currently supported on the MPS backend and will fall back to run on the CPU. "
           "This may have performance implications.")
FALLBACK_S = 0.02

_library = torch.library.Library("yem_test", "DEF")
_library.define("falls_back(Tensor x) -> Tensor")


def _falls_back(x: torch.Tensor) -> torch.Tensor:
    (on_cpu,) = torch._to_cpu([x])  # what cpu_fallback does first
    time.sleep(FALLBACK_S)  # the CPU kernel, slow
    return (on_cpu * 2).to(x.device)


_library.impl("falls_back", _falls_back, "CPU")


def test_the_profiler_names_and_times_every_op_that_copies_its_inputs_to_the_cpu():
    watch = fallbacks.Watch(profile=True)
    x = torch.randn(64)
    with watch.sample("step"):
        for _ in range(3):
            torch.ops.yem_test.falls_back(x)
            (x @ x).item()  # an ordinary op: not a fallback
    report = watch.report()
    assert report.ops == ("yem_test::falls_back",)
    assert 3 * FALLBACK_S <= report.seconds["yem_test::falls_back"] <= report.sampled_s
    assert 0 < report.share <= 1
    assert report.summary().startswith("yem_test::falls_back 0.0") and "sampled" in report.summary()


def test_each_kind_of_work_is_sampled_once_and_only_where_profiling_is_on():
    watch, x = fallbacks.Watch(profile=True), torch.randn(8)
    with watch.sample("vae"):
        torch.ops.yem_test.falls_back(x)
        with watch.sample("inner"):  # torch's profiler does not nest: the outer sample covers it
            torch.ops.yem_test.falls_back(x)
    first = watch.report().sampled_s
    with watch.sample("vae"):
        torch.ops.yem_test.falls_back(x)  # the second image: not profiled again
    assert watch.report().sampled_s == first
    assert watch.report().seconds["yem_test::falls_back"] >= 2 * FALLBACK_S
    off = fallbacks.Watch(profile=False)
    with off.sample("vae"):
        torch.ops.yem_test.falls_back(x)
    assert off.report() == fallbacks.FallbackReport()
    assert off.report().summary() == "none" and off.report().note("latents") == []


def test_the_warning_names_the_first_op_and_the_profiler_the_rest_without_doubling():
    watch = fallbacks.Watch(profile=True)
    watch.heard("yem_test::falls_back.default")  # torch's warning names the overload
    with watch.sample("render"):
        torch.ops.yem_test.falls_back(torch.randn(4))
    report = watch.report()
    assert report.ops == ("yem_test::falls_back.default",) and list(report.seconds) == list(report.ops)
    (note,) = report.note("render")
    assert note.startswith("render: 1 op(s) ran on the CPU instead of MPS (got yem_test::falls_back.default ")


def test_a_watch_listens_from_its_start_and_a_nested_one_joins_it(monkeypatch):
    monkeypatch.setattr(fallbacks, "PROFILED_BACKENDS", ("cpu",))
    with warnings.catch_warnings(record=True) as shown, fallbacks.watching("cpu") as stage:
        warnings.warn(WARNING.format("aten::col2im"), UserWarning, stacklevel=1)
        with fallbacks.watching("cpu") as inner, fallbacks.sample("step"):
            torch.ops.yem_test.falls_back(torch.randn(4))
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert inner is stage and stage.report().ops == ("aten::col2im", "yem_test::falls_back")
    assert [str(w.message) for w in shown] == ["something else"]  # fallback warnings are recorded, not shown
    with fallbacks.sample("step"):  # no watch running: nothing happens
        torch.ops.yem_test.falls_back(torch.randn(4))


def test_training_records_fallbacks_from_before_the_model_loads_and_times_a_window(cached_project, monkeypatch):
    """The warning comes while the model loads (where the old collector, started after prepare(), missed it),
    and a fallback op runs in every step: metrics/train.json names both, with the sampled time share."""
    import yem.training.loop
    from yem.training import setup
    from yem.training.loop import run_training

    root, params, hardware = cached_project
    monkeypatch.setattr(fallbacks, "PROFILED_BACKENDS", (hardware.backend,))
    prepare, update = setup.prepare, yem.training.loop.update

    def prepare_warning(*args, **kwargs):
        warnings.warn(WARNING.format("aten::_linalg_solve_ex.result"), UserWarning, stacklevel=1)
        return prepare(*args, **kwargs)

    def update_falling_back(run, step):
        torch.ops.yem_test.falls_back(torch.randn(4))
        return update(run, step)

    monkeypatch.setattr(setup, "prepare", prepare_warning)
    monkeypatch.setattr(yem.training.loop, "update", update_falling_back)
    settings = dataclasses.replace(params.train, steps=8, checkpoint_every=4)
    result = run_training(params.model, settings, hardware, root / "latents", root / "embeds", root / "lora-fb", root)
    metrics = result.metrics()
    ops = metrics["cpu_fallback_ops"]
    assert ops.startswith("aten::_linalg_solve_ex.result (not sampled), yem_test::falls_back 0.")
    assert 0 < metrics["cpu_fallback_share"] < 1  # 4 steps of the second window were profiled


@pytest.fixture(autouse=True)
def no_watch_left_running():
    yield
    assert fallbacks._active is None
