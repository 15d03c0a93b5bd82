"""The MPS op check without a Mac: record every operator a torch workload dispatches on the CPU, then look each one
up in the operator registry the torch wheel ships, to tell whether Apple's MPS backend has a kernel for it.

  Registry   torchgen/packaged/ATen/native/native_functions.yaml parsed into `name.overload` -> dispatch keys,
             following structured delegates and autogen'd variants; ops of other libraries (optimum-quanto) and
             prims are judged from the live dispatcher.
  OpRecorder a TorchDispatchMode counting each (op, input dtypes, output dtypes), optionally with the call site.
  check      ops with neither an MPS kernel nor a composite one, and float64 / complex tensors.

Record inside `recording()`: it forces attention down the math path (the one MPS takes: it has no fused
attention, forward or backward), and takes the Python-level branches torch takes for an MPS device (no foreach
gradient clipping). Autograd keys must be active for composite ops to decompose before the recorder sees them:
under `torch.inference_mode()` they arrive whole, and the recorder decomposes them itself (yem encodes and
renders under inference mode). The CPU wheel has no MPS kernels compiled in, which is why the yaml is read.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torchgen
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

NATIVE_FUNCTIONS = Path(torchgen.__file__).parent / "packaged" / "ATen" / "native" / "native_functions.yaml"
# A kernel registered under one of these runs on every backend by calling other ops, which dispatch to MPS.
COMPOSITE_KEYS = ("CompositeImplicitAutograd", "CompositeExplicitAutograd", "CompositeExplicitAutogradNonFunctional")
_has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key


# ------------------------------------------------------------------------------------------------------ registry

class Support(Enum):
    MPS = "MPS kernel"
    COMPOSITE = "composite"
    MISSING = "no MPS kernel"
    UNKNOWN = "not in registry"

    @property
    def runs_on_mps(self) -> bool:
        return self in (Support.MPS, Support.COMPOSITE)


@dataclass(frozen=True)
class Verdict:
    support: Support
    why: str  # "MPS via add.out", "CPU kernels only"


@dataclass(frozen=True)
class Entry:
    """One overload of native_functions.yaml: its dispatch keys, and the op it borrows its kernels from."""
    name: str  # "add.Tensor", "mm" (the default overload has no suffix, as in OpOverload.name())
    keys: frozenset[str]
    delegate: str | None = None  # its structured_delegate (the .out op), or the op an autogen'd variant comes from
    how: str = ""  # "structured_delegate" or "autogen"


def func_name(signature: str) -> str:
    """`add.Tensor(Tensor self, ...) -> Tensor` -> `add.Tensor`."""
    return signature.split("(", 1)[0].strip()


def _dispatch_keys(item: Mapping[str, Any]) -> frozenset[str]:
    """Keys may be comma-joined (`CPU, CUDA, MPS: abs_out`). No dispatch section and no structured delegate means
    CompositeImplicitAutograd (torchgen's default); `dispatch: {}` means no kernel at all; ufunc entries get
    generated CPU and CUDA kernels."""
    keys = {key.strip() for joined in item.get("dispatch") or {} for key in str(joined).split(",")}
    if "dispatch" not in item and "structured_delegate" not in item:
        keys.add("CompositeImplicitAutograd")
    if "ufunc_inner_loop" in item:
        keys |= {"CPU", "CUDA"}
    return frozenset(keys)


def parse_entries(items: Iterable[Mapping[str, Any]]) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    for item in items:
        name, delegate = func_name(item["func"]), item.get("structured_delegate")
        entries[name] = Entry(name, _dispatch_keys(item), delegate, "structured_delegate" if delegate else "")
        for made in filter(None, (m.strip() for m in str(item.get("autogen") or "").split(","))):
            # `autogen: foo.out`: a generated kernel that calls this op, so the same MPS support as it
            entries.setdefault(made, Entry(made, frozenset(), name, "autogen"))
    return entries


class Registry:
    """MPS support of every operator overload: from the yaml for aten, from the live dispatcher otherwise."""

    def __init__(self, entries: Mapping[str, Entry]) -> None:
        self.entries = dict(entries)

    @classmethod
    def from_yaml(cls, path: Path = NATIVE_FUNCTIONS) -> Registry:
        import yaml

        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader: 0.7 s instead of about 3 s
        with open(path, encoding="utf-8") as stream:
            return cls(parse_entries(yaml.load(stream, Loader=loader)))

    def verdict(self, qualified: str) -> Verdict:
        """`aten::add.Tensor`, `quanto::qbytes_mm`: does it run natively on MPS?"""
        namespace, _, name = qualified.partition("::")
        return self._aten(name, ()) if namespace == "aten" else dispatcher_verdict(qualified)

    def _aten(self, name: str, seen: tuple[str, ...]) -> Verdict:
        entry = self.entries.get(name)
        if entry is None:
            return Verdict(Support.UNKNOWN, "not in native_functions.yaml")
        via = f" via {' -> '.join(seen[1:] + (name,))}" if seen else ""
        if "MPS" in entry.keys:
            return Verdict(Support.MPS, "MPS" + via)
        composite = next((key for key in COMPOSITE_KEYS if key in entry.keys), None)
        if composite:
            return Verdict(Support.COMPOSITE, composite + via)
        if entry.delegate and entry.delegate not in seen:
            return self._aten(entry.delegate, seen + (name,))
        others = ", ".join(sorted(k for k in entry.keys if not k.startswith(("Sparse", "Nested", "Quantized"))))
        return Verdict(Support.MISSING, f"{others or 'no dense'} kernels only{via}")


def dispatcher_verdict(qualified: str) -> Verdict:
    """Ops outside the yaml, from what this process registered. It can depend on the platform: optimum-quanto
    registers its MPS kernels only when MPS is available, so Linux sees the composite kernels."""
    try:
        if _has_kernel(qualified, "MPS"):
            return Verdict(Support.MPS, "MPS (registered at run time)")
        for key in COMPOSITE_KEYS:
            if _has_kernel(qualified, key):
                return Verdict(Support.COMPOSITE, f"{key} (registered at run time)")
    except RuntimeError:  # not a registered operator
        return Verdict(Support.UNKNOWN, "not registered with the dispatcher")
    return Verdict(Support.MISSING, "no MPS or composite kernel registered")


@lru_cache(maxsize=1)
def default_registry() -> Registry:
    return Registry.from_yaml()


# ------------------------------------------------------------------------------------------------------ recorder

@dataclass
class OpUse:
    """Every call of one op with one combination of dtypes."""
    op: str  # "aten::add.Tensor"
    inputs: tuple[str, ...]  # dtypes of its tensor arguments ("float16", ...)
    outputs: tuple[str, ...]
    count: int = 0
    sites: list[str] = field(default_factory=list)  # up to OpRecorder.max_sites call sites
    handled_by: str | None = None  # a tensor subclass whose __torch_dispatch__ took the call (no kernel ran)
    decomposed: bool = False  # a CompositeImplicitAutograd op the recorder decomposed: its parts are recorded
    origins: set[tuple[str, str]] = field(default_factory=set)  # (file, function) of the Python making the call


def _dtypes(tree: Any) -> tuple[str, ...]:
    return tuple(str(t.dtype).removeprefix("torch.") for t in tree_leaves(tree) if isinstance(t, torch.Tensor))


def _subclasses(types: Iterable[type]) -> list[str]:
    """Tensor types in the call that define their own __torch_dispatch__ (nn.Parameter does not)."""
    plain = torch.Tensor.__torch_dispatch__
    return [t.__name__ for t in types if getattr(t, "__torch_dispatch__", plain) is not plain]


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


# What stands between the call and the recorder: this file, and torch's wrappers of __torch_dispatch__
_DISPATCH_FILES = (os.path.abspath(__file__), *(os.path.join(_TORCH_DIR, *p.split("/")) for p in (
    "_dynamo/", "_compile.py", "utils/_python_dispatch.py")))


def _origin() -> tuple[str, str]:
    """The Python frame that made the call, torch's own code included, past this recorder and the dispatch
    machinery that calls it: (file, relative to torch/ when there; function)."""
    frame = sys._getframe(1)
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_DISPATCH_FILES):
        frame = frame.f_back
    return frame.f_code.co_filename.removeprefix(_TORCH_DIR), frame.f_code.co_name


def call_site() -> str:
    """The innermost frame outside torch/ and this file, `path:line in function` (backward ops: the caller of
    .backward())."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename.startswith(_TORCH_DIR)
                                 or os.path.abspath(frame.f_code.co_filename) == os.path.abspath(__file__)):
        frame = frame.f_back
    if frame is None:
        return "?"
    roots = sorted((p for p in sys.path if p and frame.f_code.co_filename.startswith(p.rstrip(os.sep) + os.sep)),
                   key=len)
    path = os.path.relpath(frame.f_code.co_filename, roots[-1]) if roots else frame.f_code.co_filename
    return f"{path}:{frame.f_lineno} in {frame.f_code.co_name}"


class OpRecorder(TorchDispatchMode):
    """Counts every op that reaches the Python dispatch key, so that what it records is what MPS would run:
    - a CompositeImplicitAutograd op arriving whole (inference mode skips the Autograd key where such ops
      decompose) is decomposed here, through its C++ kernel, under this mode;
    - an op of another library with no MPS kernel but a composite one runs the kernel the dispatcher's table
      holds for the MPS key (that composite), not its CPU-specific one;
    - a call on a tensor subclass is handed back to it (NotImplemented), so its own inner ops are recorded."""

    def __init__(self, sites: bool = False, max_sites: int = 3) -> None:
        super().__init__()
        self.sites, self.max_sites = sites, max_sites
        self.uses: dict[tuple, OpUse] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handled_by = _subclasses(types)
        if handled_by:
            self._note(func, (args, kwargs), (), handled_by[0])
            return NotImplemented
        out, decomposed = self._run(func, args, kwargs)
        self._note(func, (args, kwargs), out, None, decomposed)
        return out

    def _run(self, func, args: tuple, kwargs: dict) -> tuple[Any, bool]:
        name = func.name()
        if _has_kernel(name, "CompositeImplicitAutograd"):
            # not func.decompose(): that prefers torch._decomp's compiler decompositions, which eager never runs
            with self:
                return func._op_dk(torch._C.DispatchKey.CompositeImplicitAutograd, *args, **kwargs), True
        if (func.namespace not in ("aten", "prims") and not _has_kernel(name, "MPS")
                and _has_kernel(name, "CompositeExplicitAutograd")):
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.MPS), *args, **kwargs), False
        return func(*args, **kwargs), False

    def _note(self, func, inputs: Any, outputs: Any, handled_by: str | None, decomposed: bool = False) -> None:
        key = (func, _dtypes(inputs), _dtypes(outputs), handled_by, decomposed)
        use = self.uses.get(key)
        if use is None:
            use = self.uses[key] = OpUse(func.name(), key[1], key[2], handled_by=handled_by, decomposed=decomposed)
        use.count += 1
        use.origins.add(_origin())
        if self.sites and len(use.sites) < self.max_sites and (site := call_site()) not in use.sites:
            use.sites.append(site)

    def records(self) -> list[OpUse]:
        return list(self.uses.values())

    def ops(self) -> set[str]:
        return {use.op for use in self.uses.values()}


def _foreach_as_on_mps(tensors: list[torch.Tensor], device: torch.device) -> bool:
    """torch's foreach kernels serve cuda, xpu and mtia, not mps: clip_grad_norm_ goes tensor by tensor there."""
    from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

    return device.type in _get_foreach_kernels_supported_devices()


@contextmanager
def recording(sites: bool = False) -> Iterator[OpRecorder]:
    """Record what runs inside, as MPS would run it: math attention, no foreach gradient clipping. The sdpa_kernel
    manager stays referenced for the whole block (`sdpa_kernel(...).__enter__()` on a temporary is collected at
    once, which restores every backend)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]), mock.patch("torch.nn.utils.clip_grad._has_foreach_support",
                                                    _foreach_as_on_mps), OpRecorder(sites=sites) as recorder:
        yield recorder


# ------------------------------------------------------------------------------------------------------- checker

def unsupported_dtypes(macos: tuple[int, int] = (14, 0)) -> dict[str, str]:
    """What MPS cannot hold at all or only partly; bfloat16 too before macOS 14."""
    found = {"float64": "MPS has no float64", "complex128": "MPS has no complex128",
             "complex64": "complex64 only on macOS 14+, and not for every op"}
    if macos < (14, 0):
        found["bfloat16"] = "bfloat16 needs macOS 14 (Sonoma) or newer"
    return found


# Python in torch that branches on the device, where the CPU recording takes a branch MPS never takes: calls made
# only from there are not MPS's. (file under torch/, function) -> what MPS does instead.
CPU_ONLY_BRANCHES = {
    ("amp/grad_scaler.py", "unscale_"): "GradScaler.unscale_ takes 1/scale in float64 except on mps:0, where it "
                                        "stays in float32",
}

# float64 data legitimately enters an MPS run made on the host (torch.from_numpy) and cast on its way to the
# device (`.to(device, torch.float32)` casts on the CPU, then copies): only these ops may hold it.
HOST_ENTRY_OPS = frozenset({"aten::lift_fresh", "aten::lift_fresh_copy"})
CAST_OPS = frozenset({"aten::_to_copy", "aten::copy_"})


@dataclass(frozen=True)
class Finding:
    kind: str  # "op": no MPS kernel; "dtype": a tensor MPS cannot hold; "cast": host data cast down (a note)
    op: str
    why: str
    uses: tuple[OpUse, ...]

    @property
    def fails(self) -> bool:
        return self.kind != "cast"


def _dtype_finding(use: OpUse, dtype: str, forbidden: Mapping[str, str]) -> tuple[str, str]:
    if use.op in HOST_ENTRY_OPS:
        return "cast", f"{dtype} made from host data: fine while it stays on the CPU"
    if use.op in CAST_OPS and not set(use.outputs) & set(forbidden):
        return "cast", f"{dtype} cast to {','.join(use.outputs)}: on MPS the cast runs on the CPU, before the copy"
    return "dtype", f"{dtype}: {forbidden[dtype]}"


def check(uses: Iterable[OpUse], registry: Registry | None = None, dtypes: Mapping[str, str] | None = None,
          allow: Callable[[OpUse], bool] = lambda use: False) -> list[Finding]:
    """Failures first (ops with neither an MPS nor a composite kernel; tensors of a dtype MPS lacks), then notes
    (such tensors only made on the host and cast down). Calls a subclass took are skipped (its inner ops are
    recorded), and so are the dtypes of decomposed ops (their parts carry the same tensors)."""
    registry, dtypes = registry or default_registry(), unsupported_dtypes() if dtypes is None else dtypes
    found: dict[tuple[str, str, str], list[OpUse]] = {}
    for use in uses:
        if use.handled_by or allow(use) or (use.origins and use.origins <= CPU_ONLY_BRANCHES.keys()):
            continue
        verdict = registry.verdict(use.op)
        if not verdict.support.runs_on_mps:
            found.setdefault(("op", use.op, f"{verdict.support.value}: {verdict.why}"), []).append(use)
        for dtype in [] if use.decomposed else sorted(set(use.inputs + use.outputs) & set(dtypes)):
            kind, why = _dtype_finding(use, dtype, dtypes)
            found.setdefault((kind, use.op, why), []).append(use)
    order = {"op": 0, "dtype": 1, "cast": 2}
    return sorted((Finding(kind, op, why, tuple(group)) for (kind, op, why), group in found.items()),
                  key=lambda f: (order[f.kind], f.op, f.why))


def failures(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.fails]


def report(findings: list[Finding]) -> str:
    """One block per finding: the op, why, its dtypes (in -> out), call count and call sites."""
    lines = [f"MPS op check: {len(failures(findings))} problem(s), {len(findings) - len(failures(findings))} note(s)"]
    for finding in findings:
        lines.append(f"  [{finding.kind}] {finding.op}  ({finding.why})  calls: {sum(u.count for u in finding.uses)}")
        for use in finding.uses:
            lines.append(f"      {','.join(use.inputs) or '-'} -> {','.join(use.outputs) or '-'}  x{use.count}")
            lines += [f"        at {site}" for site in use.sites]
    return "\n".join(lines)
