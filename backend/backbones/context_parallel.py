"""Ulysses context parallelism on a diffusers transformer, for a gang (backend/gang.py).

diffusers' `ContextParallelConfig(ulysses_degree=N)` and `enable_parallelism` apply a
model's `_cp_plan` (WanTransformer3DModel has one; ZeroScope's UNet3D has none): the
tokens entering the first block are split in N equal, contiguous chunks, one per rank;
each attention gathers every token for its own N-th of the heads with an all-to-all
(forward and backward), and the output projection gathers the tokens back, so every
rank returns the whole output. Ulysses needs the heads to divide by N (Wan 2.1 1.3B has
12: N = 2, 3, 4 or 6) and the tokens too (F'·h'·w'; an 81-frame 832×480 window has
32,760). Ring attention needs a flash-class attention kernel and cannot run on a CPU.

A tap read inside the blocks sees only this rank's chunk: `gather_tokens` puts the
chunks back in order, and its backward hands each rank its own chunk's gradient, so the
ranks, all computing the same loss from the same gathered features, each backpropagate
their own tokens' share (backend/gang.py sums the shares).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from backend.errors import BadSettingsError


def enable_ulysses(transformer: Any, size: int, device: torch.device) -> None:
    """Split `transformer`'s attention over the `size` ranks of the process group this
    process is in (Ulysses). BadSettingsError when its heads do not divide by `size`."""
    from diffusers import ContextParallelConfig

    heads = int(transformer.config.num_attention_heads)
    if heads % size:
        divisors = [n for n in range(2, heads + 1) if heads % n == 0]
        raise BadSettingsError(
            f"This model has {heads} attention heads, which a gang of {size} cannot split; "
            f"use a gang of {', '.join(map(str, divisors))}.")
    with _accelerator_count_on_cpu(device):
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=size))


def parallel_size(transformer: Any) -> int:
    """How many ranks `transformer`'s tokens are split over (1: not parallel)."""
    config = getattr(transformer, "_parallel_config", None)
    context = getattr(config, "context_parallel_config", None)
    return 1 if context is None else int(context.ulysses_degree) * int(context.ring_degree)


def check_tokens(tokens: int, size: int) -> None:
    """BadSettingsError unless a window's `tokens` split evenly over `size` ranks."""
    if tokens % size:
        raise BadSettingsError(
            f"On a gang of {size}, a window's latent tokens (frames × height × width after "
            f"the patch: {tokens}) must divide by {size}; change --frames, --width or "
            "--height (832×480 at 81 frames divides by 2, 3, 4 and 6).")


def gather_tokens(tokens: torch.Tensor, transformer: Any) -> torch.Tensor:
    """This rank's chunk of a block's tokens (B, T/N, D) → every token (B, T, D), in
    order; the backward returns this rank's chunk of the gradient."""
    from diffusers.hooks.context_parallel import EquipartitionSharder

    context = transformer._parallel_config.context_parallel_config
    return EquipartitionSharder.unshard(tokens, 1, context._flattened_mesh)


@contextmanager
def _accelerator_count_on_cpu(device: torch.device) -> Iterator[None]:
    """diffusers picks the rank's device as `rank % torch.accelerator.device_count()`,
    which divides by zero on a machine without an accelerator; on the CPU the count
    reads 1 while parallelism is enabled (every rank's device is the CPU either way)."""
    if device.type != "cpu" or torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original
