"""Backend registry and selection.

Every op in ``fastgpt.ops`` has three implementations:

- ``reference``: plain PyTorch. The ground truth the tests compare against, and the fallback for any input a
  kernel does not handle.
- ``triton``: the Triton kernels in ``kernels/`` (imported as ``fastgpt.kernels``). Runs on CUDA GPUs, and on CPU
  tensors when ``TRITON_INTERPRET=1`` was set before Triton was imported (slow; for testing only).
- ``csrc``: the C++/CUDA extension ``fastgpt._C`` (``csrc/``), when it was built and loads.

Which one runs: the innermost ``with use_backend(name)``, else the environment variable ``FASTGPT_BACKEND``, else the
op's preference order for the input's device type. A backend that cannot run on the input's device, or whose kernel
does not support the input (dtype, size), hands the call to ``reference``: never a wrong answer.

Everything here is plain Python over module-level data, so that ``torch.compile(fullgraph=True)`` traces through
the choice without graph breaks (the choice is made at trace time and guarded like any other global).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

BACKENDS = ("reference", "triton", "csrc")

# Default order when nothing is forced. On CPU the Triton interpreter is a correctness tool, never the fast path.
# On CUDA, LayerNorm and the element-wise fusions favour Triton (autotuned per GPU); ops whose measurements say
# otherwise pass their own order to `select`.
DEFAULT_PREFERENCE = {
    "cuda": ("triton", "csrc", "reference"),
    "cpu": ("csrc", "reference"),
}


def _cpu_lacks_build_capability() -> str | None:
    """The instruction set fastgpt._C was compiled for (setup.py's FASTGPT_CPU_CAPABILITY), if this CPU lacks it:
    importing the extension there could die of an illegal instruction, so it is not imported at all."""
    try:
        from fastgpt._build_config import CPU_CAPABILITY
    except ImportError:  # built before the capability was recorded, or not by setup.py
        return None
    supported = {"AVX2": "_is_avx2_supported", "AVX512": "_is_avx512_supported"}.get(CPU_CAPABILITY)
    if supported is None or getattr(torch.cpu, supported, lambda: True)():
        return None
    return CPU_CAPABILITY


def _load_extension() -> str | None:
    """Imports fastgpt._C (which runs the TORCH_LIBRARY registrations); returns why it failed, or None."""
    lacking = _cpu_lacks_build_capability()
    if lacking is not None:
        return f"fastgpt._C was compiled for {lacking}, which this CPU lacks; rebuild it here with " \
               f"`pip install --no-build-isolation -e .` (FASTGPT_CPU_CAPABILITY=AVX2 or DEFAULT picks a lower one)"
    try:
        from fastgpt import _C  # noqa: F401
    except ImportError as error:
        return f"the C++ extension fastgpt._C could not be loaded ({error}); build it with " \
               f"`pip install --no-build-isolation -e .`"
    return None


_CSRC_ERROR = _load_extension()
CSRC_LOADED = _CSRC_ERROR is None
if _CSRC_ERROR is not None:
    warnings.warn(f"fastgpt: {_CSRC_ERROR}. The csrc backend is unavailable; reference and triton still work.",
                  stacklevel=2)

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _interpreter_problem() -> str | None:
    """Triton 3.6's interpreter (torch 2.11 pins it) takes int() of a 1-element array for range() bounds, which
    NumPy 2.4 made an error: every kernel with a persistent loop fails. Triton 3.7 fixed it."""
    if not (_TRITON_INSTALLED and _TRITON_INTERPRET):
        return None
    try:
        triton, numpy = importlib.metadata.version("triton"), importlib.metadata.version("numpy")
    except importlib.metadata.PackageNotFoundError:
        return None

    def release(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())

    if release(triton) < (3, 7) and release(numpy) >= (2, 4):
        return f"Triton {triton}'s interpreter (TRITON_INTERPRET=1) fails with NumPy {numpy}: install numpy<2.4 or " \
               "triton>=3.7"
    return None


TRITON_INTERPRETER_PROBLEM = _interpreter_problem()

_CUDA = torch.cuda.is_available()
_CSRC_CUDA = _CSRC_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fastgpt::layer_norm_fwd", "CUDA")


def _why_not(name: str, device_type: str) -> str | None:
    """Why backend `name` cannot run on `device_type`, or None when it can."""
    if name == "reference":
        return None
    if name == "triton":
        if not _TRITON_INSTALLED:
            return "the triton backend needs the `triton` package (pip install triton)"
        if device_type == "cuda":
            return None if _CUDA else "the triton backend needs a CUDA GPU, and torch sees none"
        if device_type == "cpu":
            if not _TRITON_INTERPRET:
                return "the triton backend runs on CPU tensors only under TRITON_INTERPRET=1 (set before importing " \
                       "fastgpt)"
            return TRITON_INTERPRETER_PROBLEM
        return f"the triton backend does not run on {device_type} tensors"
    if name == "csrc":
        if _CSRC_ERROR is not None:
            return _CSRC_ERROR
        if device_type == "cpu" or (device_type == "cuda" and _CSRC_CUDA):
            return None
        return f"fastgpt._C was built without {device_type} kernels"
    raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")


# Plain dict lookups at call time: {(backend, device type): runs}.
_RUNS_ON = {(name, dev): _why_not(name, dev) is None for name in BACKENDS for dev in ("cpu", "cuda")}


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on `device` (``reference`` always can)."""
    device_type = torch.device(device).type
    return [name for name in BACKENDS if _why_not(name, device_type) is None]


def _check_name(name: str, origin: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{origin}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def _check_runs_somewhere(name: str) -> None:
    reasons = [_why_not(name, dev) for dev in ("cuda", "cpu")]
    if all(reasons):
        raise RuntimeError(f"backend {name!r} cannot run on this machine: " + "; ".join(dict.fromkeys(reasons)))


_ENV_BACKEND = os.environ.get("FASTGPT_BACKEND") or None
if _ENV_BACKEND is not None:
    _check_name(_ENV_BACKEND, "FASTGPT_BACKEND")
    _check_runs_somewhere(_ENV_BACKEND)

_FORCED: list[str] = []


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Forces every fastgpt op inside the block onto backend `name` (inputs it cannot handle go to reference).

    Raises at once if the backend cannot run on this machine at all, naming what is missing.
    """
    _check_name(name, "use_backend")
    _check_runs_somewhere(name)
    _FORCED.append(name)
    try:
        yield
    finally:
        _FORCED.pop()


def forced_backend() -> str | None:
    """The backend forced by `use_backend` or FASTGPT_BACKEND, if any."""
    return _FORCED[-1] if _FORCED else _ENV_BACKEND


def _differentiated_by_definition() -> bool:
    """Inside torch.func transforms (grad, vjp, jvp, jacrev, vmap...) and forward-mode AD (a dual_level): the
    kernels' autograd formulas are reverse-mode only and opaque to functorch (tangents were dropped, grad failed),
    so the op runs on reference, which the transforms differentiate and batch through its PyTorch ops."""
    return torch.autograd.forward_ad._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None


def select(device: torch.device, supports: Callable[[str], bool],
           preference: Sequence[str] | None = None) -> str:
    """Picks the backend for one call of an op whose tensors live on `device`.

    `supports(name)` says whether backend `name`'s kernel handles these inputs (dtype, sizes, layout).
    """
    if not torch.compiler.is_compiling() and _differentiated_by_definition():
        return "reference"
    forced = _FORCED[-1] if _FORCED else _ENV_BACKEND
    candidates = (forced,) if forced is not None else (preference or DEFAULT_PREFERENCE.get(device.type, ()))
    for name in candidates:
        if name != "reference" and _RUNS_ON.get((name, device.type), False) and supports(name):
            return name
    return "reference"


# ---------------------------------------------------------------------------------------------------------------
# Measured preferences: where two kernel backends take the same input, the faster one on this GPU, as recorded by
# the benchmarks (bench/results/<device>/<op>.json, installed as fastgpt.bench).

def device_slug(name: str) -> str:
    """The folder name of a device's results: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def recorded_rows(op: str, device_name: str) -> list[dict]:
    """The result rows the benchmark of `op` recorded for `device_name`, or [] when there are none."""
    spec = importlib.util.find_spec("fastgpt.bench")
    if spec is None or not spec.submodule_search_locations:
        return []
    path = Path(list(spec.submodule_search_locations)[0]) / "results" / device_slug(device_name) / f"{op}.json"
    try:
        return json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return []
