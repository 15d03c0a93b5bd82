"""Typed, validated params: the only reader (and writer) of params.yaml.

One frozen dataclass per params.yaml section. Fields have no defaults: params.yaml is the single source of
truth for every value that changes an output, so `dvc params diff` shows all of them. Parsing uses ruamel's
YAML 1.2 safe loader, as DVC does (PyYAML would read `1e-4` as a string). Every problem in the file is
reported at once: unknown keys (with the nearest valid name), missing keys, wrong types, out-of-range values.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from yem.errors import ParamsError
from yem.schema import build, kind, rule, unknown_keys

Auto = Literal["auto"]


@dataclass(frozen=True, slots=True)
class ModelParams:
    SECTION: ClassVar[str] = "model"
    id: str  # "tiny" (offline demo model), a Hugging Face hub id, or a local diffusers folder
    revision: str | None  # branch, tag or commit of a hub model; pin a commit for reproducible runs


@dataclass(frozen=True, slots=True)
class DeviceParams:
    SECTION: ClassVar[str] = "device"
    backend: Literal["auto", "cuda", "mps", "cpu"]
    mixed_precision: Literal["auto", "bf16", "fp16", "no"]  # auto: probed on the device by preflight
    memory_limit_gib: float | None = rule(above=0)  # null: what the device can use without swapping


@dataclass(frozen=True, slots=True)
class DataParams:
    SECTION: ClassVar[str] = "data"
    instance_dir: str  # your photos (+ optional same-stem .txt captions); relative to params.yaml or absolute
    prior_dir: str | None  # class images for prior preservation, or null
    resolution: int = rule(at_least=64, at_most=4096, multiple_of=16)  # each image trains at about this² pixels
    buckets: Literal["auto", "off"]  # auto: each image at the aspect-ratio bucket nearest its own; off: squares
    center_crop: bool  # false: a random crop, fixed per image
    random_flip: bool  # caches the mirrored image too; training picks one per epoch
    small_images: Literal["upscale", "refuse"]  # images smaller than the resolution


@dataclass(frozen=True, slots=True)
class PromptParams:
    SECTION: ClassVar[str] = "prompts"
    instance: str = rule(non_empty=True)  # used for every image without a caption file; holds the trigger word
    prior: str | None  # the class prompt for prior-preservation images, e.g. "a photo of a dog"
    validation: list[str] | None = rule(non_empty=True)  # null: derived from the instance prompt
    negative: str  # the negative prompt used for classifier-free guidance when rendering

    # Appended to the instance prompt for the derived validation prompt that shows the subject somewhere new.
    NEW_SETTING: ClassVar[str] = "on a beach at sunset"

    def validation_prompts(self) -> list[str]:
        """prompts.validation, or when null the instance prompt itself and the subject in a new setting."""
        if self.validation is not None:
            return list(self.validation)
        subject = self.instance.strip().rstrip(".,;:!")
        return [self.instance, f"{subject}, {self.NEW_SETTING}"]


@dataclass(frozen=True, slots=True)
class EncodeParams:
    SECTION: ClassVar[str] = "encode"
    use_t5: bool  # false: SD3's T5-free mode (zeros), saves ~9.5 GB while encoding
    max_sequence_length: int = rule(at_least=1, at_most=512)  # T5 tokens


@dataclass(frozen=True, slots=True)
class TrainParams:
    SECTION: ClassVar[str] = "train"
    steps: int = rule(at_least=1)  # optimizer updates
    batch_size: int | Auto = rule(at_least=1)
    gradient_accumulation: int = rule(at_least=1)
    effective_batch_size: int | None = rule(at_least=1)  # images per step; null: batch_size (auto = 1) × accumulation
    rank: int = rule(at_least=1, at_most=1024)
    alpha: float | None = rule(above=0)  # LoRA scale is alpha / rank; null: the rank (scale 1)
    caption_dropout: float = rule(at_least=0, at_most=1)  # share of samples trained on the empty prompt
    targets: list[str] = rule(non_empty=True)  # peft target_modules: suffixes of Linear names
    learning_rate: float = rule(above=0, at_most=1)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
    lr_warmup_steps: int = rule(at_least=0)
    weight_decay: float = rule(at_least=0)
    max_grad_norm: float | None = rule(above=0)
    seed: int
    gradient_checkpointing: bool | Auto
    compile: bool | Auto  # torch.compile each transformer block; auto: on CUDA, for 400 steps or more
    saved_activations: float = rule(above=0, at_most=1)  # compiled blocks keep this share for backward
    quantize_base: Literal["none", "int8"]  # int8: the frozen transformer blocks' Linears in int8 (optimum-quanto)
    attention: Literal["auto", "sdpa", "chunked"]  # chunked: no (T × T) scores kept; auto: chunked on MPS only
    weighting_scheme: Literal["logit_normal", "mode", "sigma_sqrt", "cosmap", "none"]
    logit_mean: float
    logit_std: float = rule(above=0)
    mode_scale: float
    precondition_outputs: bool
    prior_loss_weight: float = rule(at_least=0)
    repeats: int = rule(at_least=1)
    checkpoint_every: int = rule(at_least=1)
    checkpoints_keep: int = rule(at_least=1)
    max_bad_steps: int = rule(at_least=1)  # non-finite steps in a row before rolling back to a checkpoint
    on_nonfinite: Literal["lower_lr", "fp32", "stop"]  # what the rollback retries with
    devices: int | Auto = rule(at_least=1)  # GPUs to train on (through accelerate); auto: all visible

    @property
    def lora_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else self.alpha

    def effective_batch(self, processes: int) -> int:
        """Images per optimizer step, fixed by params whatever the memory: train.effective_batch_size, or batch_size
        (auto counting as 1) × gradient_accumulation × processes. batch_size auto only splits it into micro-batches."""
        if self.effective_batch_size is not None:
            return self.effective_batch_size
        return (1 if self.batch_size == "auto" else self.batch_size) * self.gradient_accumulation * processes

    def problems(self) -> list[str]:
        found = []
        if self.lr_warmup_steps > self.steps:
            found.append(f"train.lr_warmup_steps: exceeds train.steps (got {self.lr_warmup_steps} > "
                         f"{self.steps}). Lower it or raise train.steps.")
        if self.effective_batch_size is not None and isinstance(self.batch_size, int):
            if self.effective_batch_size != self.batch_size * self.gradient_accumulation:
                found.append(f"train.effective_batch_size: must equal batch_size × gradient_accumulation "
                             f"(got {self.effective_batch_size} ≠ {self.batch_size} × {self.gradient_accumulation})."
                             f" Set it to null, or set train.batch_size: auto.")
        return found


@dataclass(frozen=True, slots=True)
class RenderParams:
    SECTION: ClassVar[str] = "render"
    seeds: list[int] = rule(non_empty=True)
    steps: int = rule(at_least=1)
    guidance_scale: float = rule(at_least=0)
    resolution: int | None = rule(at_least=64, at_most=4096, multiple_of=16)  # null: the training resolution
    checkpoints: list[int] = rule(each_at_least=1)  # steps of intermediate adapters to render as extra rows
    attention: Literal["auto", "sdpa", "chunked"]  # as train.attention
    devices: int | Auto = rule(at_least=1)  # processes (GPUs) sharing the images; auto: all visible


@dataclass(frozen=True, slots=True)
class ExportParams:
    SECTION: ClassVar[str] = "export"
    name: str = rule(non_empty=True)  # the model card's title and the suggested Hub repo name
    license: str = rule(non_empty=True)
    formats: list[Literal["diffusers", "comfyui", "kohya"]] = rule(non_empty=True)


@dataclass(frozen=True, slots=True)
class ThermalParams:
    SECTION: ClassVar[str] = "thermal"
    # Runtime behaviour only: it changes how training runs, never what it produces, so no stage lists it.
    OUTPUT_NEUTRAL: ClassVar[bool] = True
    policy: Literal["pause", "stop", "ignore"]
    max_pause_s: float = rule(at_least=0)


SECTIONS = (ModelParams, DeviceParams, DataParams, PromptParams, EncodeParams, TrainParams, RenderParams,
            ExportParams, ThermalParams)


@dataclass(frozen=True, slots=True)
class Params:
    model: ModelParams
    device: DeviceParams
    data: DataParams
    prompts: PromptParams
    encode: EncodeParams
    train: TrainParams
    render: RenderParams
    export: ExportParams
    thermal: ThermalParams
    root: Path  # the folder holding params.yaml: relative data paths are resolved against it


def load_params(path: Path | str) -> Params:
    """Read and validate params.yaml; raise ParamsError listing every problem found."""
    path = Path(path)
    return _validated(read_yaml(path), path)


def _validated(raw: Any, path: Path) -> Params:
    """The Params in `raw` (params.yaml as loaded, from `path`); raise ParamsError listing every problem found."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ParamsError(str(path), [f": expected sections like 'train:' at the top level (got {kind(raw)})."])
    names = [cls.SECTION for cls in SECTIONS]
    problems += unknown_keys(raw, names, prefix="")
    sections = {}
    for cls in SECTIONS:
        if cls.SECTION not in raw:
            problems.append(f"{cls.SECTION}: missing section. Add it (see the params.yaml in the yem repository).")
            continue
        section, found = build(cls, raw[cls.SECTION], cls.SECTION)
        problems += found
        sections[cls.SECTION] = section
    if not problems:
        problems += _across_sections(sections)
    if problems:
        raise ParamsError(str(path), problems)
    return Params(**sections, root=path.resolve().parent)


def _across_sections(sections: dict[str, Any]) -> list[str]:
    data, prompts = sections["data"], sections["prompts"]
    found = []
    if data.prior_dir is not None and prompts.prior is None:
        found.append("prompts.prior: required when data.prior_dir is set (got null). Give the class prompt, "
                     "e.g. 'a photo of a dog', or set data.prior_dir: null.")
    render, train = sections["render"], sections["train"]
    if any(step % train.checkpoint_every or step >= train.steps for step in render.checkpoints):
        found.append(f"render.checkpoints: each step must be a multiple of train.checkpoint_every "
                     f"({train.checkpoint_every}) below train.steps ({train.steps}) (got {render.checkpoints}). "
                     f"Only those adapters are kept.")
    if prompts.prior is not None and data.prior_dir is None:
        found.append("data.prior_dir: required when prompts.prior is set (got null). Point it at class images, "
                     "or set prompts.prior: null.")
    return found


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(str(path), [": file not found. Run from the project folder or pass --params."]) from None
    except UnicodeDecodeError as e:
        raise ParamsError(str(path), [f": not valid YAML ({e}). Fix the syntax."]) from None
    return _parsed(text, path)


def _parsed(text: str, path: Path) -> Any:
    from ruamel.yaml import YAML, YAMLError

    try:
        return YAML(typ="safe", pure=True).load(text)
    except YAMLError as e:
        detail = " ".join(str(e).split())
        raise ParamsError(str(path), [f": not valid YAML ({detail}). Fix the syntax."]) from None


def set_values(path: Path, updates: dict[str, Any]) -> str:
    """Set dotted keys (`train.rank`) in params.yaml and return its new text. Nothing is written unless the whole
    file validates with the new values; then it is replaced atomically. Only the edited values' lines change:
    comments, quoting, `null`s, list styles and long lines round-trip as they were."""
    from yem import atomic

    old = path.read_text(encoding="utf-8")
    new = _edited(old, updates, path)
    _validated(_parsed(new, path), path)  # refuse to write a params file that does not validate
    if new != old:
        atomic.write_text(path, new)
    return new


def _edited(text: str, updates: dict[str, Any], path: Path) -> str:
    from io import StringIO

    from ruamel.yaml.comments import CommentedSeq

    yaml = _round_trip_yaml()
    doc = yaml.load(text)
    for dotted, value in updates.items():
        section, _, key = dotted.partition(".")
        if not isinstance(doc.get(section), dict) or key not in doc[section]:
            raise ParamsError(str(path), [f"{dotted}: no such key to set. Check the spelling."])
        old = doc[section][key]
        if old == value and isinstance(old, bool) == isinstance(value, bool):
            continue  # unchanged: keep how it is written (1.0e-3 stays 1.0e-3)
        if isinstance(old, CommentedSeq) and isinstance(value, list):
            old[:] = value  # in place: the list keeps its [flow] or block style and its comments
        else:
            doc[section][key] = value
    buffer = StringIO()
    yaml.dump(doc, buffer)
    return buffer.getvalue()


def _round_trip_yaml():
    """ruamel set up to write params.yaml back as yem lays it out: `null` stays `null` (ruamel would write nothing),
    list items sit two columns in, and a long prompt is never folded over two lines."""
    from ruamel.yaml import YAML
    from ruamel.yaml.representer import RoundTripRepresenter

    class Representer(RoundTripRepresenter):  # a subclass: registering on RoundTripRepresenter would change
        pass  # every YAML() of the process

    Representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    yaml = YAML()  # round trip: comments, key order, 1.0e-3 and quotes survive
    yaml.Representer = Representer
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    return yaml
