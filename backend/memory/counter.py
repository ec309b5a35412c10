"""Memory of a model's work, measured without weights, without a GPU and without the memory.

The models are built on PyTorch's meta device (no weights are made or read) and given
fake storage under `FakeTensorMode`: every tensor has its shape, dtype and byte size,
none has data. The code to be planned then runs unchanged on those fake tensors while
`LiveBytes`, a dispatch mode, counts the bytes of the tensor storages that are alive
after every operation and records the highest count. What is counted is what the code
allocates (parameters, activations, what autograd saves for backward, gradients), so
the figure follows the code instead of a formula about it.

A fake GPU cannot run backward on a PyTorch built without CUDA (autograd asks the CUDA
runtime for a stream for every node), so a plan for a CUDA device runs on fake CPU
tensors and `CudaAutocast` stands in for `torch.autocast("cuda")`: it applies CUDA
autocast's casting rules (half-precision matmuls and convolutions, float32 norms,
softmax and pointwise transcendentals, widest-type `cat`), above autograd as the real
autocast is, so what autograd saves has the dtypes a GPU would hold. Each storage of a
CUDA plan is rounded up to the caching allocator's 512-byte block.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

_THIS_THREAD = threading.local()  # .fake_worlds: how many fake_world blocks this thread is in
CUDA_BLOCK_BYTES = 512  # the CUDA caching allocator rounds every block up to this


def rounded(nbytes: int, block: int) -> int:
    """Bytes the allocator hands out for a request: ⌈nbytes / block⌉ · block (block 1: exact)."""
    return -(-nbytes // block) * block


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages and records their peak.

    A storage is counted once, from the first operation that returns a tensor on it
    (or from `track`), until Python frees it (a weak reference's callback) or `untrack`
    takes it out. `peak` is the highest `current` seen since the last `reset_peak`.
    """

    def __init__(self, block: int = 1) -> None:
        super().__init__()
        self.block = block
        self.current = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def track(self, tensor: torch.Tensor) -> None:
        """Count `tensor`'s storage (made before this mode was entered) if not yet counted."""
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        nbytes = rounded(storage.nbytes(), self.block)
        if nbytes == 0:
            return
        self._seen[storage] = weakref.ref(storage, lambda _ref, n=nbytes: self._free(n))
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def untrack(self, tensor: torch.Tensor) -> int:
        """Stop counting `tensor`'s storage, now and on every later view of it: it lives
        elsewhere (host memory, in a CUDA plan). Returns the bytes it had counted."""
        storage = tensor.untyped_storage()
        counted = self._seen.get(storage)
        nbytes = rounded(storage.nbytes(), self.block) if counted is not None else 0
        self.current -= nbytes
        # Marked, not dropped, so a view's operation does not count it again; the old
        # weak reference goes with the mark, its callback unsent.
        self._seen[storage] = None
        return nbytes

    def track_module(self, module: torch.nn.Module) -> None:
        """Count a module's parameters and buffers."""
        for tensor in [*module.parameters(), *module.buffers()]:
            self.track(tensor)

    def reset_peak(self) -> None:
        self.peak = self.current

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.track, out)
        return out


# CUDA autocast's casting rules (aten/src/ATen/autocast_mode.cpp, the CUDA lists), by the
# name of the Python function or Tensor method that reaches them.
_HALF_OPS = frozenset({
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "convolution", "_convolution", "conv_tbc", "prelu", "addmm", "addmv", "addr", "matmul",
    "__matmul__", "einsum", "mm", "mv", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul",
    "scaled_dot_product_attention",
})
_FLOAT_OPS = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm",
    "group_norm", "rms_norm", "norm", "frobenius_norm", "nuclear_norm", "cosine_similarity",
    "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "kl_div", "dist", "pdist", "cdist",
    "renorm", "logsumexp", "softmax", "log_softmax", "cumprod", "cumsum", "prod", "sum",
    "interpolate",
})
_WIDEST_OPS = frozenset({"cat", "stack", "addcdiv", "addcmul", "atan2", "cross", "dot",
                         "index_put", "scatter_add", "tensordot"})
_LOW = (torch.float16, torch.bfloat16)


class CudaAutocast(TorchFunctionMode):
    """torch.autocast("cuda", dtype) for code running on fake CPU tensors (see the module
    docstring): the same casts, made above autograd so autograd saves the cast tensors."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _HALF_OPS:
            args, kwargs = _cast((args, kwargs), (torch.float32,), self.dtype)
        elif name in _FLOAT_OPS and "dtype" not in kwargs:
            args, kwargs = _cast((args, kwargs), _LOW, torch.float32)
        elif name in _WIDEST_OPS:
            tensors = [t for t in _tensors((args, kwargs)) if t.is_floating_point()]
            if {t.dtype for t in tensors} & {torch.float32} and {t.dtype for t in tensors} & set(_LOW):
                args, kwargs = _cast((args, kwargs), _LOW, torch.float32)
        return func(*args, **kwargs)


def _tensors(tree: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    tree_map_only(torch.Tensor, found.append, tree)
    return found


def _cast(tree: Any, sources: tuple[torch.dtype, ...], target: torch.dtype) -> Any:
    return tree_map_only(torch.Tensor, lambda t: t.to(target) if t.dtype in sources else t, tree)


SMALL_REAL_NUMEL = 65536


class RealScalars(TorchDispatchMode):
    """Operations on small real tensors only (a schedule's timesteps and ᾱ table) run for
    real, so the code planned can read numbers from them (int(t), float(ᾱ_t)); every
    other operation goes on to the fake mode below."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        tensors = _tensors((args, kwargs))
        if tensors and all(not isinstance(t, FakeTensor) and t.device.type == "cpu"
                           and t.numel() <= SMALL_REAL_NUMEL for t in tensors):
            with _disable_current_modes():
                return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if not tensors and all(t.device.type == "cpu" and t.numel() <= SMALL_REAL_NUMEL
                               for t in _tensors(out)):
            # A small tensor made from nothing (a σ grid, a timestep): made again for real.
            with _disable_current_modes():
                return func(*args, **kwargs)
        return out


@contextlib.contextmanager
def fake_world(block: int = 1) -> Iterator[tuple[FakeTensorMode, LiveBytes]]:
    """Fake tensors (large real inputs such as a clip's pixels are faked on the way in,
    small ones computed for real: RealScalars) and a LiveBytes counting them; while it
    lasts, `values_unknown()` is True in this thread."""
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = LiveBytes(block)
    _THIS_THREAD.fake_worlds = getattr(_THIS_THREAD, "fake_worlds", 0) + 1
    try:
        with fake, RealScalars(), tracker:
            yield fake, tracker
    finally:
        _THIS_THREAD.fake_worlds -= 1


def values_unknown() -> bool:
    """Whether this thread runs inside fake_world, where no tensor holds the code's own
    values (fake storage, and small tensors computed from fakes): code that chooses by
    values (which frames a region is in) takes the most it could read."""
    return getattr(_THIS_THREAD, "fake_worlds", 0) > 0


def materialise(module: torch.nn.Module, tracker: LiveBytes, device: str = "cpu") -> torch.nn.Module:
    """A module built on the meta device, given fake storage (inside fake_world) and counted."""
    module.to_empty(device=device)
    tracker.track_module(module)
    return module


def measure(run: Callable[[], Any], tracker: LiveBytes) -> tuple[int, Any]:
    """(peak live bytes while `run` runs, its result): the peak counts what was alive before."""
    tracker.reset_peak()
    result = run()
    return tracker.peak, result
