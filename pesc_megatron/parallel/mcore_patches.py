"""The project's patches to megatron-core, one per broken symbol, each with its reason: mostly
the CPU backend that lets its GPT + MoE stack run on CPU/gloo, plus a few that apply on GPUs too.

megatron-core assumes CUDA in a handful of places. On a machine without CUDA, `apply()`
installs one patch per broken megatron-core symbol (listed in `PATCHES`, each with the reason),
plus a torch function mode that maps tensors requested on a CUDA device to the CPU, which
covers the many `device="cuda"` / `torch.cuda.current_device()` literals in one place
(`.cuda()` then returns the tensor itself, not a copy). With CUDA available only
`NO_TE_PATCHES` applies, and only when Transformer Engine is absent. `EVERYWHERE_PATCHES`
(avoidable copies, not CUDA assumptions) apply on every machine.
"""
from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import weakref
from dataclasses import dataclass
from multiprocessing.managers import SyncManager
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

from pesc_megatron.parallel.lifetime import serve_for_parent

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


class _CudaTensorTypeNames(TorchFunctionMode):
    """`Tensor.type()` names a CPU tensor as its CUDA counterpart ('torch.cuda.FloatTensor'), for
    megatron-core code that checks dtypes by comparing those strings."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and \
                out.startswith("torch.") and not out.startswith("torch.cuda."):
            out = "torch.cuda." + out[len("torch."):]
        return out


def _with_cuda_type_names(original: Callable) -> Callable:
    def run(*args, **kwargs):
        with _CudaTensorTypeNames():
            return original(*args, **kwargs)

    return run


def _state_dict_with_initial_step(original: Callable) -> Callable:
    """DistributedOptimizer.state_dict, when megatron-core steps a torch.optim optimizer (no
    apex/TE), reads `step` from its per-parameter state, which torch only creates on the first
    step: before it (a fresh optimizer about to load a checkpoint, or one saved before training)
    the state is first made what that step would make (zero moments, step 0)."""

    def state_dict(self):
        from megatron.core.optimizer import distrib_optimizer

        if not distrib_optimizer.HAVE_APEX_OR_TE and self.init_state_fn is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            if params and all(len(self.optimizer.state[p]) == 0 for p in params):
                self.init_state_fn(self.optimizer, self.config)
                for p in params:
                    self.optimizer.state[p].setdefault("step", torch.tensor(0.0))
        return original(self)

    return state_dict


def _load_state_dict_unshared_steps(original: Callable) -> Callable:
    """DistributedOptimizer.load_state_dict under no_grad (fp32 params are their own main
    params: loading copies into views of them), then one `step` tensor per param: without
    apex/TE it restores the step as one tensor shared by every param, which torch's Adam would
    then advance once per param at each step."""

    def load_state_dict(self, state_dict):
        with torch.no_grad():
            original(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    return load_state_dict


def _set_states_keeping_step(original: Callable) -> Callable:
    """DistributedOptimizer._set_main_param_and_optimizer_states, leaving the param's `step`
    as load_state_dict restored it from param_groups."""

    def set_states(self, model_param, tensors):
        group, order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group]["params"][order]
        step = self.optimizer.state.get(main_param, {}).get("step")
        precision_aware = self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
        if torch.is_tensor(step) and not precision_aware:
            tensors = {**tensors, "step": step}  # copied onto itself
        return original(self, model_param, tensors)

    return set_states


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
    Patch("megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32",
          "asserts param.grad.type() == 'torch.cuda.FloatTensor'; runs as is once CPU tensors "
          "report CUDA type names", _with_cuda_type_names),
    Patch("megatron.core.optimizer.optimizer:clip_grad_by_total_norm_fp32",
          "the same function, imported by name: the optimizers' step() looks it up here",
          _with_cuda_type_names),
    Patch("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__",
          "accepts only params whose type() is torch.cuda.{Float,Half,BFloat16}Tensor",
          _with_cuda_type_names),
]

def _sort_chunks_unless_identity(original: Callable) -> Callable:
    """sort_chunks_by_idxs, skipped when the order it sorts into is the one the chunks are
    in (one EP x TP rank: the chunks already come in local-expert order)."""

    identity = {}  # id -> (weak reference, is identity): the dispatcher's index tensors

    def sort_chunks_by_idxs(input, split_sizes, sorted_idxs, probs=None, fused=False):
        ref, same = identity.get(id(sorted_idxs), (None, False))
        if ref is None or ref() is not sorted_idxs:  # one host copy per index tensor
            same = torch.equal(sorted_idxs.cpu(), torch.arange(len(sorted_idxs)))
            identity[id(sorted_idxs)] = (weakref.ref(sorted_idxs), same)
        if same:
            return input, probs
        return original(input, split_sizes, sorted_idxs, probs=probs, fused=fused)

    return sort_chunks_by_idxs


def _results_queue_dying_with_parent(original):
    """dist_checkpointing's write-results queue lives in a spawned multiprocessing manager
    process, made at a rank's first save, which outlives a rank that is killed and dies of a
    scheduler's SIGTERM before the rank's preemption save: this one's manager dies with its
    rank, and only then."""
    module = importlib.import_module("megatron.core.dist_checkpointing.strategies."
                                     "filesystem_async")

    def get_write_results_queue():
        if module._results_queue is None:
            manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
            manager.start(initializer=serve_for_parent)
            module._results_queue = manager.Queue()
        return module._results_queue

    return get_write_results_queue


def _rope_with_cached_angles(original: Callable) -> Callable:
    from pesc_megatron.model import rope

    def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None,
                             **newer):  # arguments of later releases: theirs to handle
        if not newer and rope.rotary_runs_here(t, freqs, config, cp_group):
            return rope.apply_rotary_pos_emb(t, freqs, cu_seqlens, mscale)
        return original(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale,
                        cp_group=cp_group, **newer)

    return apply_rotary_pos_emb


# Needed everywhere (CPU or GPU, with or without Transformer Engine).
EVERYWHERE_PATCHES: list[Patch] = [
    Patch("megatron.core.dist_checkpointing.strategies.filesystem_async:"
          "_get_write_results_queue",
          "its manager process (one per rank, from the first save on) outlives a killed rank: "
          "found running 47 minutes after a test suite; this one dies with the rank",
          _results_queue_dying_with_parent),
    Patch("megatron.core.transformer.moe.token_dispatcher:sort_chunks_by_idxs",
          "the alltoall dispatcher sorts the tokens by local expert even with one EP x TP "
          "rank, where that order is the identity: a copy of every routed token and of its "
          "gradient per layer", _sort_chunks_unless_identity),
    Patch("megatron.core.transformer.attention:apply_rotary_pos_emb",
          "without TE's fused kernel every layer recomputes cos and sin (for packed sequences "
          "with a host read per sample) and rotates in six passes each way: model/rope.py "
          "computes the angles once per forward and rotates in three", _rope_with_cached_angles),
]

# Needed wherever Transformer Engine is absent, GPU or not.
NO_TE_PATCHES: list[Patch] = [
    Patch("megatron.core.transformer.moe.moe_utils:te_general_gemm",
          "router_gating_linear tests `te_general_gemm is not None`, a NameError when TE is absent",
          lambda original: original),
    Patch("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.state_dict",
          "with torch.optim (no apex/TE) it asserts one `step` in the per-param state, which "
          "torch creates only on the first step: fails before it (e.g. to load a checkpoint)",
          _state_dict_with_initial_step),
    Patch("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.load_state_dict",
          "restores torch Adam's `step` as one tensor shared by all params (then advanced once "
          "per param per step) and copies into fp32 params' views outside no_grad",
          _load_state_dict_unshared_steps),
    Patch("megatron.core.optimizer.distrib_optimizer:"
          "DistributedOptimizer._set_main_param_and_optimizer_states",
          "copies torch Adam's `step` from the loaded param state, where fully_reshardable has "
          "none (KeyError) and dp_reshardable has the loading optimizer's own, not the saved one",
          _set_states_keeping_step),
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
            f"megatron-core {version} is not supported by pesc-megatron's megatron-core patches "
            f"(supported: {', '.join(SUPPORTED_MCORE)}); install megatron-core>=0.16.1,<0.20")


def _install(patches: list[Patch]) -> None:
    for p in patches:
        try:
            owner, name = _resolve(p.target)
        except (ImportError, AttributeError) as e:
            raise RuntimeError(f"megatron-core patches: cannot patch {p.target} ({e})") from e
        setattr(owner, name, p.make(getattr(owner, name, None)))


def apply(force: bool = False) -> bool:
    """Installs the patches for every machine, the no-TE ones where TE is absent, and the CPU
    backend if CUDA is unavailable (or `force`). Returns True if the CPU backend is active.
    The version check applies everywhere: every machine gets some of these patches."""
    global _applied
    if _applied:
        return True
    check_mcore_version()
    _install(EVERYWHERE_PATCHES)
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
