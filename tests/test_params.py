"""params.yaml validation: every problem at once, each naming the key and what to do."""

import shutil
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests.conftest import REPO
from yem.errors import ParamsError
from yem.params import load_params, set_values


def edited(tmp_path: Path, edit) -> Path:
    yaml = YAML()
    doc = yaml.load((REPO / "params.yaml").read_text())
    edit(doc)
    path = tmp_path / "params.yaml"
    with open(path, "w") as f:
        yaml.dump(doc, f)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    return caught.value.problems


def test_committed_params_load():
    params = load_params(REPO / "params.yaml")
    assert params.model.id == "tiny"
    assert params.train.learning_rate == pytest.approx(1e-3)  # YAML 1.2: `1.0e-3` is a float, not a string


def test_unknown_key_suggests_the_nearest(tmp_path):
    found = problems(edited(tmp_path, lambda d: d["train"].update(rnak=8)))
    assert found == ["train.rnak: unknown key. Did you mean 'train.rank'?"]


def test_unknown_section_suggests_the_nearest(tmp_path):
    found = problems(edited(tmp_path, lambda d: d.update(trian={"rank": 4})))
    assert found == ["trian: unknown key. Did you mean 'train'?"]


def test_missing_key_wrong_type_and_out_of_range_are_reported_together(tmp_path):
    def edit(doc):
        del doc["train"]["seed"]
        doc["train"]["steps"] = "many"
        doc["train"]["rank"] = 0
        doc["data"]["resolution"] = 1000
        doc["prompts"]["validation"] = []
        doc["train"]["lr_scheduler"] = "cosin"

    found = problems(edited(tmp_path, edit))
    assert "train.seed: missing. Add it (expected an integer)." in found
    assert "train.steps: expected an integer (got 'many')." in found
    assert "train.rank: must be at least 1 (got 0)." in found
    assert any(p.startswith("data.resolution: must be a multiple of 16") and "Use 992 or 1008" in p for p in found)
    assert "prompts.validation: must not be empty. Give at least one value." in found
    assert any(p.startswith("train.lr_scheduler: expected 'constant'") and "Did you mean 'cosine'?" in p
               for p in found)
    assert len(found) == 6


def test_booleans_are_not_integers_and_integers_are_numbers(tmp_path):
    found = problems(edited(tmp_path, lambda d: d["train"].update(steps=True, learning_rate=1)))
    assert found == ["train.steps: expected an integer (got True)."]


def test_auto_and_null_where_allowed(tmp_path):
    params = load_params(edited(tmp_path, lambda d: (d["train"].update(batch_size="auto"),
                                                     d["render"].update(resolution=None))))
    assert params.train.batch_size == "auto" and params.render.resolution is None
    found = problems(edited(tmp_path, lambda d: d["train"].update(batch_size="big")))
    assert found == ["train.batch_size: expected an integer or 'auto' (got 'big')."]


def test_cross_section_rule_prior_needs_a_prompt(tmp_path):
    found = problems(edited(tmp_path, lambda d: d["data"].update(prior_dir="data/prior")))
    assert len(found) == 1 and found[0].startswith("prompts.prior: required when data.prior_dir is set")


def test_message_names_the_file(tmp_path):
    path = edited(tmp_path, lambda d: d["train"].update(rank=-1))
    with pytest.raises(ParamsError, match=str(path)):
        load_params(path)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    assert problems(bad)[0].startswith(": not valid YAML")
    assert problems(tmp_path / "nope.yaml")[0].startswith(": file not found")


def test_set_values_keeps_comments_and_refuses_invalid(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    set_values(path, {"train.rank": 8, "prompts.validation": ["a sks dog"]})
    text = path.read_text()
    assert "# LoRA scale = alpha / rank" in text
    params = load_params(path)
    assert params.train.rank == 8 and params.prompts.validation == ["a sks dog"]
    with pytest.raises(ParamsError):
        set_values(path, {"train.rank": 0})
    with pytest.raises(ParamsError, match="no such key"):
        set_values(path, {"train.rnak": 2})
    assert load_params(path).train.rank == 8  # the refused writes left the file as it was


def test_quantize_base_names_the_key_and_the_nearest_value(tmp_path):
    assert load_params(edited(tmp_path, lambda d: d["train"].update(quantize_base="int8"))).train.quantize_base \
        == "int8"
    found = problems(edited(tmp_path, lambda d: d["train"].update(quantize_base="int4")))
    assert found == ["train.quantize_base: expected 'none' or 'int8' (got 'int4'). Did you mean 'int8'?"]


def test_set_values_changes_only_the_lines_of_the_edited_values(tmp_path):
    """Six settings used to make a 17-line diff: `revision: null` became `revision:`, list items moved, a long
    prompt was folded. Now each edited value changes its own line and nothing else does."""
    import difflib

    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    set_values(path, {})
    assert path.read_bytes() == (REPO / "params.yaml").read_bytes()  # a round trip without edits is the same file
    long_prompt = "a photo of zwx dog: sitting on a red sofa, " + "soft window light, " * 8
    updates = {"model.id": "stabilityai/stable-diffusion-3-medium-diffusers", "data.instance_dir": "/me/My dog #2",
               "prompts.instance": "a photo of zwx dog", "data.resolution": 1024, "train.steps": 500,
               "prompts.validation": [long_prompt, "zwx dog"], "render.seeds": [3, 4]}
    set_values(path, updates)
    before, after = (REPO / "params.yaml").read_text().splitlines(), path.read_text().splitlines()
    changed = [line for line in difflib.unified_diff(before, after, lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert len(changed) == 2 * 8, "\n".join(changed)  # 7 keys, the validation list has 2 lines
    assert "+  seeds: [3, 4]" in changed and "  revision: null          # pin" in "\n".join(after)
    assert f"+    - '{long_prompt}'" in changed
    params = load_params(path)
    assert params.prompts.validation == [long_prompt, "zwx dog"] and params.data.instance_dir == "/me/My dog #2"


def test_a_single_problem_is_one_line_naming_the_file_and_the_key(tmp_path):
    path = edited(tmp_path, lambda d: d["data"].update(resolution=1000))
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    assert str(caught.value) == (f"{path} data.resolution: must be a multiple of 16 (latent ×8, patch ×2) (got 1000). "
                                 f"Use 992 or 1008.")
