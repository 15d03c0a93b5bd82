"""dvc.yaml must match the code: DVC does not follow Python imports, so a missing dep means a stale output.

For every stage: its command is `python -m stages.<name>`; its code deps are exactly the stage file plus every
yem/stages module it imports (transitively); its params are exactly the params.yaml sections it reads; and
every path in its command is one of its deps or outputs.
"""

import ast
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests.conftest import REPO
from yem import paths as artefacts
from yem.params import SECTIONS

DVC = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())
STAGES = DVC["stages"]
OUTPUT_NEUTRAL = {cls.SECTION for cls in SECTIONS if getattr(cls, "OUTPUT_NEUTRAL", False)}


def module_file(name: str) -> Path | None:
    for candidate in (REPO / (name.replace(".", "/") + ".py"), REPO / name.replace(".", "/") / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    expanded = set()
    for name in names:  # importing yem.x runs yem/__init__.py first
        parts = name.split(".")
        expanded |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return {n for n in expanded if n.split(".")[0] in ("yem", "stages")}


def code_closure(stage: str) -> set[str]:
    todo, seen = [REPO / "stages" / f"{stage}.py"], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [f for f in map(module_file, imported_modules(path)) if f is not None]
    return {p.relative_to(REPO).as_posix() for p in seen}


def sections_read(stage: str) -> set[str]:
    """Attributes taken from the object `load_params(...)` returned, in the stage file."""
    tree = ast.parse((REPO / "stages" / f"{stage}.py").read_text())
    bound = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
             and getattr(node.value.func, "id", None) == "load_params" for t in node.targets}
    assert bound, f"stages/{stage}.py never calls load_params"
    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id in bound} - {"root"}


def declared_outputs(spec: dict) -> set[str]:
    paths = set()
    for kind in ("outs", "metrics", "plots"):
        for entry in spec.get(kind, []):
            paths.add(entry if isinstance(entry, str) else next(iter(entry)))
    return paths


@pytest.mark.parametrize("stage", list(STAGES))
def test_command_runs_the_stage_module(stage):
    assert STAGES[stage]["cmd"].startswith(f"python -m stages.{stage} ")


@pytest.mark.parametrize("stage", list(STAGES))
def test_code_deps_are_exactly_the_imported_modules(stage):
    declared = {d for d in STAGES[stage]["deps"] if d.endswith(".py")}
    needed = code_closure(stage)
    assert not needed - declared, f"{stage}: add to deps in dvc.yaml: {sorted(needed - declared)}"
    assert not declared - needed, f"{stage}: deps no longer imported, remove: {sorted(declared - needed)}"


@pytest.mark.parametrize("stage", list(STAGES))
def test_params_are_exactly_the_sections_read(stage):
    declared = set(STAGES[stage].get("params", []))
    read = sections_read(stage) - OUTPUT_NEUTRAL
    assert declared == read, f"{stage}: dvc.yaml params {sorted(declared)} but the stage reads {sorted(read)}"
    assert not declared & OUTPUT_NEUTRAL


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_path_in_the_command_is_a_dep_or_an_output(stage):
    spec = STAGES[stage]
    words = shlex.split(spec["cmd"])
    paths = {w for w in words[3:] if not w.startswith("--")}
    known = set(spec.get("deps", [])) | declared_outputs(spec)
    volatile = {p for p in paths if p.startswith("logs/")}  # written, but no stage may depend on them
    assert paths - volatile <= known, f"{stage}: not declared in dvc.yaml: {sorted(paths - volatile - known)}"
    assert declared_outputs(spec) <= paths, f"{stage}: outputs missing from the command line"


def test_the_commands_pass_the_paths_yem_defines():
    """dvc.yaml hands every stage its paths; they are the ones yem.paths names, so yem's own commands (the
    one-liner's --output, yem runs) find the results where the pipeline put them."""
    used = {w for spec in STAGES.values() for w in shlex.split(spec["cmd"])[3:] if not w.startswith("--")}
    assert used == {p.as_posix() for p in artefacts.ARTEFACTS}


def test_stages_form_the_documented_chain():
    assert list(STAGES) == ["preflight", "encode", "latents", "train", "render", "card"]
    assert STAGES["preflight"].get("always_changed") is True


@pytest.mark.parametrize("stage, forbidden", [("preflight", {"diffusers", "transformers", "peft"}),
                                               ("card", {"torch", "diffusers", "transformers", "peft"})])
def test_stages_without_models_do_not_import_them(stage, forbidden):
    """Importing torch + diffusers costs seconds per process: the light stages must not pay it."""
    code = f"import sys, stages.{stage}; print(sorted(m for m in {sorted(forbidden)!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", f"stages.{stage} imports {result.stdout.strip()}"
