"""Wan's VAE a call at a time (backend/backbones/wan_vae.py) against diffusers' own encode
and decode, on the tiny Wan's random VAE: the same calls on the same tensors, so every
result is equal bit for bit, tiled or not, and the pixels gather in the host buffers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.backbones import wan_vae
from backend.backbones.wan_tiny import build_tiny_wan
from backend.edit import load_engine


@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    return build_tiny_wan()["vae"]


def host_buffers() -> tuple[list[torch.Tensor], wan_vae.HostBuffer]:
    made: list[torch.Tensor] = []

    def host_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        made.append(torch.empty(shape, dtype=dtype))
        return made[-1]

    return made, host_buffer


def test_the_streamed_encode_is_the_vaes_own_bit_for_bit(vae: torch.nn.Module) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (13, 48, 80, 3), dtype=np.uint8)
    with torch.no_grad():
        whole = vae.encode(wan_vae.to_pixels(frames)).latent_dist.parameters
    streamed = wan_vae.encode_streamed(vae, frames, 4, torch.device("cpu"))
    assert streamed.shape == (1, 32, 4, 6, 10)
    assert torch.equal(streamed, whole)
    assert list(wan_vae.encode_calls(13, 4)) == [(0, 1), (1, 5), (5, 9), (9, 13)]


@pytest.mark.parametrize("tiles", [None, (32, 16), (48, 40)], ids=["whole", "tiles-32-by-16", "tiles-48-by-40"])
def test_the_streamed_decode_is_the_vaes_own_bit_for_bit(vae: torch.nn.Module, tiles) -> None:  # noqa: ANN001
    """Whole frames; tiles of 32 pixels at a stride of 16 (6 × 10 latent cells: 3 rows
    and 5 columns, the last cut short); 48-pixel tiles at 40 (an overlap of 8, cut
    short at both edges)."""
    z = torch.randn(1, 16, 4, 6, 10, generator=torch.Generator().manual_seed(1))
    saved = vae.use_tiling
    if tiles is not None:
        vae.enable_tiling(tiles[0], tiles[0], tiles[1], tiles[1])
    try:
        with torch.no_grad():
            whole = wan_vae.to_frames(vae.decode(z, return_dict=False)[0])
        made, host_buffer = host_buffers()
        streamed = wan_vae.decode_to_host(vae, z, 13, host_buffer)
    finally:
        vae.use_tiling = saved
    assert streamed.shape == (13, 48, 80, 3) and streamed.dtype == torch.uint8
    assert torch.equal(streamed, whole)
    assert streamed.data_ptr() == made[-1].data_ptr()  # the frames are the host buffer's
    # tiled: each tile's frames, then the blended clip, gathered in host memory too
    assert len(made) == (1 if tiles is None else 1 + 1 + {16: 3 * 5, 40: 2 * 2}[tiles[1]])


def test_a_vae_without_the_private_loop_is_encoded_and_decoded_whole(
        vae: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another diffusers version's VAE: the backbone falls back to vae.encode and
    vae.decode, with the same results."""
    backbone = load_engine("wan-tiny", device="cpu").backbone
    frames = np.random.default_rng(2).integers(0, 256, (9, 48, 64, 3), dtype=np.uint8)
    streamed_latent = backbone.encode(frames, 1)
    streamed_frames = backbone.decode_slices(streamed_latent, 1)[0]()
    monkeypatch.setattr("backend.backbones.wan.streamable", lambda _vae: False)
    assert torch.equal(backbone.encode(frames, 1), streamed_latent)
    assert np.array_equal(backbone.decode_slices(streamed_latent, 1)[0](), streamed_frames)
    from diffusers import AutoencoderKL

    assert wan_vae.streamable(vae) and not wan_vae.streamable(AutoencoderKL())
