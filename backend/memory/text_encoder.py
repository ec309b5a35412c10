"""Where the text encoder is while prompts are embedded: the embed phase of an edit.

The text encoder never shares the GPU with the denoiser. On a GPU it lives in host
memory (both backbones' loaders put it there), and an edit embeds all its prompts
(source, target, negative) in one phase before the denoiser is used
(backend/method/engine.py Engine.embed_prompts), in one of two places:

    on the GPU, alone   the denoiser and the VAE step out to host memory, the encoder
                        comes in, embeds, and goes back to host memory before they
                        return (the default: the encoder's maths at GPU speed, for the
                        price of moving the denoiser and the VAE out and back)
    on the CPU          the text_encoder_offload saver: the encoder embeds where it
                        lives and never visits the GPU; the denoiser and the VAE stay
                        (for an encoder that does not fit the GPU even alone, as Wan's
                        10.6 GiB UMT5 on a 10 GiB budget)

With the text_encoder_fp8 saver the encoder embeds under diffusers' layerwise casting
(backend/memory/savers.py fp8_cast: its layers stored in float8, each cast to the model's
dtype for its own forward), in either place; it goes to the GPU in float8.

Either way nothing moves when the prompts' embeddings are in the embedding cache
(backend/method/embeddings.py): the phase is not entered. The memory plan counts the
embed phase as exactly this (backend/memory/planner.py `_plan`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from backend.backbones.base import Backbone
from backend.memory.savers import fp8_cast

Move = Callable[[torch.nn.Module, torch.device], Any]


@contextlib.contextmanager
def text_encoder_placed(backbone: Backbone, on_cpu: bool, *, fp8: bool = False,
                        host: torch.device | None = None, move: Move | None = None,
                        active: bool | None = None) -> Iterator[None]:
    """While the block runs (the prompts' embedding), the text encoder is on the GPU
    with neither the denoiser nor the VAE there, or (`on_cpu`) in host memory with
    nothing moved; after it, the encoder is in host memory and the others are back.
    `fp8`: the encoder embeds with its layers stored in float8 (its own weights after).

    It acts when the model runs on another device than the host (`active`, default:
    the backbone's device is not the host's); on a CPU nothing moves. `move(module,
    device)` moves a network (default module.to; tests pass a recorder)."""
    host = host or torch.device("cpu")
    move = move or (lambda module, device: module.to(device))
    active = backbone.device.type != host.type if active is None else active
    if not active:
        yield
        return
    with fp8_cast(backbone.modules()[2], backbone.dtype) if fp8 else contextlib.nullcontext():
        if on_cpu:
            yield
        else:
            with _alone_on_the_gpu(backbone, host, move):
                yield


@contextlib.contextmanager
def _alone_on_the_gpu(backbone: Backbone, host: torch.device, move: Move) -> Iterator[None]:
    device = backbone.device
    denoiser, vae, text_encoder = backbone.modules()
    move(denoiser, host)
    move(vae, host)
    move(text_encoder, device)
    try:
        yield
    finally:
        move(text_encoder, host)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        move(denoiser, device)
        move(vae, device)
