"""CPU backend for megatron-core: the few patches that let its GPT + MoE stack run on CPU/gloo.

megatron-core assumes CUDA in a handful of places. On a machine without CUDA, `apply()`
installs one patch per broken megatron-core symbol (listed in `PATCHES`, each with the reason),
plus a torch function mode that maps tensors requested on a CUDA device to the CPU, which
covers the many `device="cuda"` / `torch.cuda.current_device()` literals in one place
(`.cuda()` then returns the tensor itself, not a copy). With CUDA available only
`NO_TE_PATCHES` applies, and only when Transformer Engine is absent.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

# megatron-core minor releases the patches are written for (0.16 tested in CI; 0.17-0.19 are
# what GPU clusters run, where the CPU backend is not used). Others are refused: the symbols
# patched here move between releases.
SUPPORTED_MCORE = ("0.16", "0.17", "0.18", "0.19")

_applied = False


# --------------------------------------------------------------------------------------------
# Device mapping: every tensor requested on a CUDA device is made on the CPU.
# --------------------------------------------------------------------------------------------
def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # An int device (e.g. from torch.cuda.current_device()) means a CUDA ordinal.
    return isinstance(device, int) and not isinstance(device, bool)


_CPU = torch.device("cpu")


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites `device=<cuda>` arguments and `.cuda()` / `.to(<cuda>)` calls to the CPU."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_CPU if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# CUDA stand-ins for the runtime calls megatron-core makes unconditionally.
# --------------------------------------------------------------------------------------------
class _NullStream:
    """Stands in for torch.cuda.Stream/Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args):
        pass

    def wait_event(self, *args):
        pass

    def record_event(self, *args):
        return _NullStream()

    def record(self, *args):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def wait(self, *args):
        pass


def _cpu_rng_state(device=None, clone=False, graph_safe=False):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _tracker_add(self, name, seed):
    """CudaRNGStatesTracker.add on the CPU generator (same bookkeeping as megatron-core)."""
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"cuda rng state {name} already exists")
    orig = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig)
    self._is_initialized = True


@contextlib.contextmanager
def _tracker_fork(self, name="model-parallel-rng"):
    """CudaRNGStatesTracker.fork on the CPU generator, without its check that the CPU state is
    untouched (here the CPU generator is the one being forked)."""
    if name not in self.states_:
        raise Exception(f"cuda rng state {name} is not added")
    orig_state, orig_name = torch.get_rng_state(), self._current_state_name
    if orig_name != "default-rng":
        self.states_[orig_name] = orig_state
    torch.set_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        self.states_[name] = torch.get_rng_state()
        if orig_name != "default-rng":
            orig_state = self.states_[orig_name]
        torch.set_rng_state(orig_state)
        self._current_state_name = orig_name


def _all_to_all_with_list_splits(original: Callable) -> Callable:
    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *a, **k):
        if isinstance(output_split_sizes, torch.Tensor):
            output_split_sizes = output_split_sizes.tolist()
        if isinstance(input_split_sizes, torch.Tensor):
            input_split_sizes = input_split_sizes.tolist()
        return original(output, input, output_split_sizes, input_split_sizes, *a, **k)

    return all_to_all_single


@dataclass(frozen=True)
class Patch:
    target: str  # "module:attribute.path" of the megatron-core (or torch) symbol replaced
    why: str
    make: Callable[[Any], Any]  # original -> replacement


def _const(value):
    return lambda original: value


PATCHES: list[Patch] = [
    Patch("torch.cuda:current_device",
          "RotaryEmbedding, DDP buffers and many others ask for the CUDA ordinal; 0 is mapped to CPU",
          _const(lambda: 0)),
    Patch("torch.cuda:Stream", "MoEAlltoAllTokenDispatcher creates a D2H stream at init",
          _const(_NullStream)),
    Patch("torch.cuda:Event", "dispatchers and DDP record events", _const(_NullStream)),
    Patch("torch.cuda:current_stream", "stream comparisons in the alltoall dispatcher",
          _const(lambda *a, **k: _NullStream())),
    Patch("torch.cuda:stream", "`with torch.cuda.stream(s)` blocks",
          _const(lambda *a, **k: contextlib.nullcontext())),
    Patch("torch.cuda:synchronize", "host syncs are no-ops on CPU", _const(lambda *a, **k: None)),
    Patch("megatron.core.tensor_parallel.random:_get_cuda_rng_state",
          "the RNG tracker forks the CUDA generator; on CPU it forks the CPU one",
          _const(_cpu_rng_state)),
    Patch("megatron.core.tensor_parallel.random:_set_cuda_rng_state",
          "the RNG tracker forks the CUDA generator; on CPU it forks the CPU one",
          _const(_set_cpu_rng_state)),
    Patch("megatron.core.tensor_parallel.random:CudaRNGStatesTracker.add",
          "add() seeds and reads torch.cuda's generator directly", _const(_tracker_add)),
    Patch("megatron.core.tensor_parallel.random:CudaRNGStatesTracker.fork",
          "fork() warns whenever the CPU generator changes, which on CPU is every fork",
          _const(_tracker_fork)),
    Patch("torch.distributed:all_to_all_single",
          "megatron-core's all_to_all (alltoall dispatcher) passes split sizes as tensors, "
          "which gloo rejects",
          _all_to_all_with_list_splits),
]

# Needed wherever Transformer Engine is absent, GPU or not.
NO_TE_PATCHES: list[Patch] = [
    Patch("megatron.core.transformer.moe.moe_utils:te_general_gemm",
          "router_gating_linear tests `te_general_gemm is not None`, a NameError when TE is absent",
          lambda original: original),
]


def _resolve(target: str):
    module_name, attr_path = target.split(":")
    owner = importlib.import_module(module_name)
    *parents, name = attr_path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    return owner, name


def have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def check_mcore_version(version: str | None = None) -> None:
    if version is None:
        from megatron.core import package_info

        version = package_info.__version__
    if ".".join(version.split(".")[:2]) not in SUPPORTED_MCORE:
        raise RuntimeError(
            f"megatron-core {version} is not supported by pesc-megatron's CPU backend "
            f"(supported: {', '.join(SUPPORTED_MCORE)}); install megatron-core>=0.16.1,<0.20")


def _install(patches: list[Patch]) -> None:
    for p in patches:
        try:
            owner, name = _resolve(p.target)
        except (ImportError, AttributeError) as e:
            raise RuntimeError(f"CPU backend: cannot patch {p.target} ({e})") from e
        setattr(owner, name, p.make(getattr(owner, name, None)))


def apply(force: bool = False) -> bool:
    """Installs the CPU backend if CUDA is unavailable (or `force`). Returns True if active."""
    global _applied
    if _applied:
        return True
    check_mcore_version()
    if not have_te():
        _install(NO_TE_PATCHES)
    if torch.cuda.is_available() and not force:
        return False
    _install(PATCHES)
    mode = CudaToCpuMode()
    mode.__enter__()  # stays on for the life of the process
    # A mode is switched off while its handler runs, and Tensor.backward/autograd.backward are
    # handled functions: re-enter it around the engine so autograd Functions' backward see it.
    run_backward = torch.autograd._engine_run_backward

    def _engine_run_backward(*args, **kwargs):
        with mode:
            return run_backward(*args, **kwargs)

    torch.autograd._engine_run_backward = _engine_run_backward
    _applied = True
    return True
