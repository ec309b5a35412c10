"""Wan's VAE a call at a time, the clip's pixels in host memory.

diffusers' AutoencoderKLWan is causal in time. It encodes the first frame alone and then
four frames a call, and decodes one latent frame a call (the first gives one frame, each
later one four); each call reads what the calls before it left in the VAE's cache
(`_enc_feat_map`, `_feat_map`: the last frames each causal convolution saw). Its own
`encode` and `decode` run that loop on the whole clip on the device, and `decode`
gathers every call's output there (a growing `torch.cat`, then a clamp): a 240-frame
clip's pixels several times over on the GPU.

The functions here make the same calls, in the same order, with the same cache, on the
same tensors, so the result is the same arithmetic (bit for bit: tests/test_wan_vae.py):

    encode_streamed   the clip's pixels leave host memory one call's frames at a time
    decode_to_host    each call's frames go to host memory as they come: as uint8
                      frames without tiling (decode_streamed); with the VAE's tiling
                      (decode_tiled) each tile's frames, blended there as `tiled_decode`
                      blends them, into the clip's uint8 frames

so the device holds the networks, the cache, one call's activations and its output,
whatever the clip's length. Where the pixels go is `host_buffer(shape, dtype)`: an
empty host tensor (Backbone.host_buffer, which the memory plan counts as host memory).

They lean on diffusers' private loop (the names in `streamable`); a VAE without them
(another diffusers version) is encoded and decoded whole by the backbone instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

HostBuffer = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
"""host_buffer(shape, dtype) → an empty tensor in host memory."""

_PRIVATE = ("clear_cache", "_cached_conv_counts", "encoder", "decoder", "quant_conv",
            "post_quant_conv", "blend_v", "blend_h", "spatial_compression_ratio",
            "tile_sample_min_height", "tile_sample_min_width", "tile_sample_stride_height",
            "tile_sample_stride_width", "use_tiling")


def streamable(vae: torch.nn.Module) -> bool:
    """Whether `vae` has the loop this module runs (diffusers 0.42's AutoencoderKLWan)."""
    if not all(hasattr(vae, name) for name in _PRIVATE):
        return False
    # the class's: the memory plan wraps the instance's forward (planner._tiles_replayed)
    return "first_chunk" in inspect.signature(type(vae.decoder).forward).parameters


def _patch_size(vae: torch.nn.Module) -> int | None:
    return getattr(vae.config, "patch_size", None)


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 → (1, 3, N, H, W) float32 in [−1, 1]: x = u/127.5 − 1."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1


def to_frames(video: torch.Tensor) -> torch.Tensor:
    """(1, 3, n, H, W) in the VAE's dtype → (n, H, W, 3) uint8: clamped to [−1, 1] as the
    VAE clamps, then u = round((x + 1)·127.5)."""
    video = video[0].clamp(-1, 1).float().permute(1, 2, 3, 0)
    return ((video + 1) * 127.5).round().to(torch.uint8)


def encode_calls(frames: int, temporal_factor: int) -> Iterator[tuple[int, int]]:
    """The frames of each encoder call, [start, end): the first alone, then fours."""
    yield 0, 1
    for start in range(1, frames, temporal_factor):
        yield start, start + temporal_factor


@torch.no_grad()
def encode_streamed(vae: torch.nn.Module, frames: np.ndarray, temporal_factor: int,
                    device: torch.device) -> torch.Tensor:
    """(N, H, W, 3) uint8 in host memory, N = 4k + 1 → the posterior's moments
    (1, 2·z_dim, k + 1, H/8, W/8) on `device` in the VAE's dtype: what
    `vae.encode(to_pixels(frames)).latent_dist.parameters` holds, each call's frames
    converted and moved to the device only for its call."""
    dtype = next(vae.parameters()).dtype
    patch = _patch_size(vae)
    vae.clear_cache()
    outputs = []
    for start, end in encode_calls(len(frames), temporal_factor):
        pixels = to_pixels(frames[start:end]).to(device, dtype)
        if patch is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

            pixels = patchify(pixels, patch_size=patch)
        vae._enc_conv_idx = [0]
        outputs.append(vae.encoder(pixels, feat_cache=vae._enc_feat_map, feat_idx=vae._enc_conv_idx))
        del pixels
    moments = vae.quant_conv(torch.cat(outputs, dim=2))
    vae.clear_cache()
    return moments


def _decode_calls(vae: torch.nn.Module, latent_frames: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Each decoder call's output, in order, one call a latent frame (1, C, 1, h, w),
    after post_quant_conv; the cache is the VAE's, cleared before the first call."""
    vae.clear_cache()
    for index, latent_frame in enumerate(latent_frames):
        vae._conv_idx = [0]
        yield vae.decoder(latent_frame, feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                          first_chunk=index == 0)


def _gathered(pieces: Iterable[torch.Tensor], frames: int, dim: int, host_buffer: HostBuffer,
              convert: Callable[[torch.Tensor], torch.Tensor] = lambda piece: piece) -> torch.Tensor:
    """The pieces, each some frames along `dim`, each converted and copied in order into
    one host buffer of `frames` along it as it comes (the piece then goes, before the
    next is made)."""
    out: torch.Tensor | None = None
    written = 0
    for piece in pieces:
        piece = convert(piece)
        if out is None:
            shape = list(piece.shape)
            shape[dim] = frames
            out = host_buffer(tuple(shape), piece.dtype)
        out.narrow(dim, written, piece.shape[dim]).copy_(piece)
        written += piece.shape[dim]
        del piece
    return out


def _unpatched(vae: torch.nn.Module, video: torch.Tensor) -> torch.Tensor:
    patch = _patch_size(vae)
    if patch is None:
        return video
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    return unpatchify(video, patch_size=patch)


def decode_to_host(vae: torch.nn.Module, z: torch.Tensor, frames: int,
                   host_buffer: HostBuffer) -> torch.Tensor:
    """`decode_tiled` where the VAE would tile (its tiling on, and the latent larger
    than a tile, as AutoencoderKLWan._decode decides), else `decode_streamed`."""
    ratio = vae.spatial_compression_ratio
    tiles = vae.use_tiling and (z.shape[4] > vae.tile_sample_min_width // ratio
                                or z.shape[3] > vae.tile_sample_min_height // ratio)
    return (decode_tiled if tiles else decode_streamed)(vae, z, frames, host_buffer)


@torch.no_grad()
def decode_streamed(vae: torch.nn.Module, z: torch.Tensor, frames: int,
                    host_buffer: HostBuffer) -> torch.Tensor:
    """z (1, C, T, h, w) in the VAE's dtype (unnormalised: z·std + mean), frames = the
    frames T latent frames decode to → (frames, H, W, 3) uint8 in host memory:
    `to_frames(vae.decode(z).sample)`, each call's frames moved out as they come."""
    latent = vae.post_quant_conv(z)
    calls = _decode_calls(vae, (latent[:, :, index:index + 1] for index in range(latent.shape[2])))
    out = _gathered(calls, frames, 0, host_buffer, lambda piece: to_frames(_unpatched(vae, piece)))
    vae.clear_cache()
    return out


@torch.no_grad()
def decode_tiled(vae: torch.nn.Module, z: torch.Tensor, frames: int,
                 host_buffer: HostBuffer) -> torch.Tensor:
    """`decode_streamed` with the VAE's tiling, as `vae.tiled_decode` tiles: overlapping
    tiles of tile_sample_min pixels at tile_sample_stride, each decoded through every
    frame with a cache of its own, blended with the tile above and the one to the left
    over the overlap (the VAE's own blend_v, blend_h), cut to the stride and placed.
    Here each tile's frames go to host memory as they come, and the blending runs there
    on the same values in the same order."""
    ratio = vae.spatial_compression_ratio
    patch = _patch_size(vae) or 1
    _, _, _, height, width = z.shape
    tile_h, tile_w = vae.tile_sample_min_height // ratio, vae.tile_sample_min_width // ratio
    stride_h, stride_w = vae.tile_sample_stride_height // ratio, vae.tile_sample_stride_width // ratio
    out_stride_h, out_stride_w = vae.tile_sample_stride_height // patch, vae.tile_sample_stride_width // patch
    blend_h = vae.tile_sample_min_height // patch - out_stride_h
    blend_w = vae.tile_sample_min_width // patch - out_stride_w
    sample_h, sample_w = height * ratio // patch, width * ratio // patch

    rows: list[list[torch.Tensor]] = []
    for top in range(0, height, stride_h):
        row = []
        for left in range(0, width, stride_w):
            tile = z[:, :, :, top:top + tile_h, left:left + tile_w]
            row.append(_tile_to_host(vae, tile, frames, host_buffer))
        rows.append(row)
    vae.clear_cache()

    blended: torch.Tensor | None = None
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            if r > 0:
                tile = vae.blend_v(rows[r - 1][c], tile, blend_h)
            if c > 0:
                tile = vae.blend_h(row[c - 1], tile, blend_w)
            if blended is None:
                blended = host_buffer((1, tile.shape[1], frames, sample_h, sample_w), tile.dtype)
            y, x = r * out_stride_h, c * out_stride_w
            cut = tile[:, :, :, :min(out_stride_h, sample_h - y), :min(out_stride_w, sample_w - x)]
            blended[:, :, :, y:y + cut.shape[3], x:x + cut.shape[4]].copy_(cut)
    del rows
    chunks = (blended[:, :, start:start + 4] for start in range(0, frames, 4))  # no whole-clip temporary
    return _gathered(chunks, frames, 0, host_buffer, lambda chunk: to_frames(_unpatched(vae, chunk)))


def _tile_to_host(vae: torch.nn.Module, tile: torch.Tensor, frames: int,
                  host_buffer: HostBuffer) -> torch.Tensor:
    """One tile (1, C, T, h', w') decoded through every frame with its own cache, as
    tiled_decode decodes it (post_quant_conv a frame at a time), into host memory."""
    latent_frames = (vae.post_quant_conv(tile[:, :, index:index + 1]) for index in range(tile.shape[2]))
    return _gathered(_decode_calls(vae, latent_frames), frames, 2, host_buffer)
