"""The layout keeps its promises (docs/architecture.md): small modules, typed records across boundaries, and every
build artefact's path defined once, in yem.paths."""

import ast
import importlib
from pathlib import Path

import pytest

from tests.conftest import REPO, cpu_hardware
from yem import paths
from yem.errors import CacheError
from yem.hardware.record import Hardware

MODULES = sorted((REPO / "yem").rglob("*.py"))
MAX_LINES = 350
TOP_LEVEL = 10


def literals(path: Path) -> list[str]:
    return [node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)
            and isinstance(node.value, str)]


# Every module of yem and the stages, by import name (a package by its own name; `python -m yem` left out: it runs)
IMPORTABLE = sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                    for p in [*MODULES, *(REPO / "stages").glob("*.py")] if p.name != "__main__.py")


@pytest.mark.parametrize("module", IMPORTABLE)
def test_every_module_imports(module):
    """The first thing the floors run checks (.ci/run): with the lowest versions of the dependencies, every name
    yem takes from them still exists."""
    importlib.import_module(module)


def test_modules_stay_small_and_the_top_level_holds_only_what_every_stage_shares():
    long = {p.relative_to(REPO).as_posix(): n for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules: {long}"
    top = sorted(p.name for p in (REPO / "yem").glob("*.py"))
    assert len(top) <= TOP_LEVEL, top


def test_every_folder_says_what_lives_there_and_what_it_may_import():
    for init in (REPO / "yem").rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc.lower() or init.parent.name == "yem", f"{init}: say what it may import"


@pytest.mark.parametrize("artefact", paths.ARTEFACTS, ids=str)
def test_a_build_artefact_path_is_written_only_in_yem_paths(artefact):
    name = artefact.as_posix()
    written = [p.relative_to(REPO).as_posix() for p in MODULES if p.name != "paths.py"
               and any(text == name or text.startswith(f"{name}/") for text in literals(p))]
    assert not written, f"{artefact} spelled out in {written}: use yem.paths"


def test_no_record_crosses_a_boundary_as_a_dict_read_by_key():
    """The hardware record and the run log are typed: nobody reads them with hardware["…"] or log["…"]."""
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
                assert node.value.id not in ("hardware", "log", "facts"), f"{path}:{node.lineno}"


def test_the_hardware_record_round_trips_and_rejects_a_damaged_file_naming_every_problem(tmp_path):
    record = cpu_hardware()
    record.save(tmp_path / "preflight.json")
    assert Hardware.load(tmp_path / "preflight.json") == record
    (tmp_path / "bad.json").write_text('{"backend": "tpu", "dtype": "float32", "chip": 3, "torch": "2.13", '
                                       '"diffusers": "0.42", "memory_budget_gib": -1, "extra": 1}')
    with pytest.raises(CacheError) as error:
        Hardware.load(tmp_path / "bad.json")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'bad.json'}: not a hardware record")
    for problem in ("backend: expected 'cuda' or 'mps' or 'cpu' (got 'tpu')", "chip: expected a string (got 3)",
                    "memory_budget_gib: must be greater than 0", "extra: unknown key"):
        assert problem in message
    assert message.endswith("Rerun the preflight stage: dvc repro.")
    with pytest.raises(CacheError, match="missing. Run the preflight stage first"):
        Hardware.load(tmp_path / "none.json")
