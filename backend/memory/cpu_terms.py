"""What a CPU edit's memory holds beyond its tensors: the terms a plan for device "cpu" adds.

The memory plan (backend/memory/planner.py) counts tensor storages. On a CPU two more
things are sized by the code and grow with the clip, so a CPU plan counts them too
(docs/memory.md gives the measurements behind them):

- The convolutions' column buffers. PyTorch runs a convolution it does not hand to
  oneDNN on its "slow" kernels (ConvolutionMM2d/3d.cpp), which unfold the input into a
  columns matrix and multiply: a buffer allocated inside the kernel, so no tensor the
  plan sees holds it. Wan's VAE, with few channels a frame, takes this path on every
  3×3×3 convolution, and its columns are 27 times the input.
  `CpuConvolutionScratch` asks PyTorch which kernel it would run each convolution on
  (the same choice, made from the same shapes) and counts the columns beside what is
  alive while it runs.
- oneDNN's copy of a convolution's weight: the convolutions PyTorch gives to oneDNN
  have their plain weight reordered into oneDNN's blocked layout on every call
  (`reordered_weight_bytes`), 59 MB for ZeroScope's largest.
- The clip's frames, uint8 numpy arrays the engine keeps for the whole edit
  (`host_frames`).

A CUDA plan has neither (cuDNN's workspaces are another matter, for `bench --memory`;
the frames are host memory), so these terms are for CPU plans only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from backend.memory.counter import LiveBytes

_Backend = torch._C._ConvBackend
# The kernels that unfold the whole batch at once (compute_columns2d / compute_columns3d).
_WHOLE_BATCH = {_Backend.Slow2d, _Backend.Slow3d}
# The kernels that unfold one batch element at a time (dilated; transposed over the input).
_PER_ELEMENT = {_Backend.SlowDilated2d, _Backend.SlowDilated3d,
                _Backend.SlowTranspose2d, _Backend.SlowTranspose3d}
BACKWARD_BUFFERS = 2  # backward unfolds the input again (for the weight's gradient) beside
#                       the gradient's own columns


def columns_bytes(backend: _Backend, input_shape: Sequence[int], weight_shape: Sequence[int],
                  output_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                  transposed: bool, element_size: int) -> int:
    """Bytes of the columns matrix a slow CPU convolution kernel allocates (0 for oneDNN's
    and the others, which unfold nothing).

    With input (N, C_in, *S_in), kernel k = ∏ kernel sides, output (N, C_out, *S_out):

        Slow2d, Slow3d             N · C_in · k · ∏S_out · element size
                                   (0 for a 1×…×1 kernel at stride 1 without padding:
                                   the columns are then a view of the input)
        SlowDilated2d/3d           C_in · k · ∏S_out · element size   (one element at a time)
        SlowTranspose2d/3d         C_out · k · ∏S_in · element size   (one element at a time)
    """
    kernel = math.prod(weight_shape[2:])
    if backend in _WHOLE_BATCH:
        if kernel == 1 and all(s == 1 for s in stride) and all(p == 0 for p in padding):
            return 0
        return input_shape[0] * input_shape[1] * kernel * math.prod(output_shape[2:]) * element_size
    if backend in _PER_ELEMENT:
        if transposed:
            out_channels = weight_shape[1]  # a transposed weight is (C_in, C_out / groups, *k)
            return out_channels * kernel * math.prod(input_shape[2:]) * element_size
        return input_shape[1] * kernel * math.prod(output_shape[2:]) * element_size
    return 0


class CpuConvolutionScratch(TorchDispatchMode):
    """Counts each convolution's scratch (a slow kernel's column buffers, `columns_bytes`,
    BACKWARD_BUFFERS of them in backward; oneDNN's reordered weight) on top of the tensors `tracker` holds when the kernel has made its
    outputs: the buffer lives only while the kernel runs, so it raises the peak, never
    the current count. Entered inside the tracker (so it sees each call first)."""

    def __init__(self, tracker: LiveBytes) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default:
            scratch = _scratch(*args[:9], output_shape=out.shape, buffers=1)
        elif func is torch.ops.aten.convolution_backward.default:
            grad_output, data, weight, _bias_sizes, *rest = args[:10]
            scratch = _scratch(data, weight, None, *rest, output_shape=grad_output.shape,
                               buffers=BACKWARD_BUFFERS)
        else:
            return out
        self.tracker.peak = max(self.tracker.peak, self.tracker.current + scratch)
        return out


def _scratch(data: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
             padding: list[int], dilation: list[int], transposed: bool, output_padding: list[int],
             groups: int, output_shape: Sequence[int], buffers: int) -> int:
    """The column buffers of one convolution call, on the kernel PyTorch picks for it."""
    backend = torch._C._select_conv_backend(data, weight, bias, stride, padding, dilation, transposed,
                                            output_padding, groups, None)
    if backend == _Backend.Mkldnn:
        return reordered_weight_bytes(weight.shape, weight.element_size())
    return buffers * columns_bytes(backend, data.shape, weight.shape, output_shape, stride, padding,
                                   transposed, data.element_size())


def reordered_weight_bytes(weight_shape: Sequence[int], element_size: int) -> int:
    """oneDNN's copy of a convolution's weight in its blocked layout: PyTorch keeps the
    weight plain, so each call reorders it (forward and the input's gradient alike):
    ∏ weight shape · element size."""
    return math.prod(weight_shape) * element_size


def host_frames(model_frames: int, size: tuple[int, int], *peaks: dict[str, int]
                ) -> tuple[dict[str, int], ...]:
    """Phase peaks with the clip's frames added, uint8 numpy arrays no tensor holds.

    Engine.transfer keeps the model's frames (F = model_frames(N) frames of w × h × 3
    bytes) for the whole edit, and decoding gathers the result's slices in a list, then
    joins them (two arrays of as many bytes again):

        every phase after the weights   + F·w·h·3
        decode                          + 3·F·w·h·3   (a bound: the list and the joined
                                                       array meet only at the join)
    """
    frame_bytes = model_frames * size[0] * size[1] * 3
    return tuple({name: peak if name == "weights" else peak + frame_bytes * (3 if name == "decode" else 1)
                  for name, peak in phase_peaks.items()} for phase_peaks in peaks)
