"""The little PNG work the extension does itself: sizes, alpha, writing RGBA frames.

The server returns RGB frames; where the source showed nothing (a text strip, a
picture-in-picture scene) the result keeps the source's transparency, so the
extension puts the source render's alpha into the result frames. A result edited
inside a region comes back composited, with the feathered region as its alpha; the
extension turns it into the layer that, laid over the source, gives that composite
(`layer_over_source`). A region's rendered matte is sent as grey PNGs (`matte_grey`,
`encode_grey`). Decoding is done by Blender (strip_io); this module encodes PNGs with
the standard library and numpy (both in every Blender), so it is tested without Blender.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's header."""
    if data[:8] != SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])


def resize_nearest(plane: np.ndarray, width: int, height: int) -> np.ndarray:
    """A 2-D array resampled to height x width, each output pixel from its centre's source."""
    rows = ((np.arange(height) + 0.5) * plane.shape[0] / height).astype(int)
    cols = ((np.arange(width) + 0.5) * plane.shape[1] / width).astype(int)
    return plane[np.minimum(rows, plane.shape[0] - 1)][:, np.minimum(cols, plane.shape[1] - 1)]


def on_canvas(pixels: np.ndarray, width: int, height: int, left: int, top: int) -> np.ndarray:
    """(h, w, 4) pixels put on a transparent (height, width, 4) canvas at (left, top)."""
    canvas = np.zeros((height, width, 4), np.uint8)
    rows, cols = pixels.shape[:2]
    canvas[top:top + rows, left:left + cols] = pixels
    return canvas


def encode_rgba(pixels: np.ndarray) -> bytes:
    """(H, W, 4) uint8, top row first → PNG bytes (8-bit RGBA, no filtering)."""
    height, width, channels = pixels.shape
    if channels != 4 or pixels.dtype != np.uint8:
        raise ValueError("encode_rgba needs (H, W, 4) uint8 pixels")
    return _encode(np.ascontiguousarray(pixels).reshape(height, width * 4), width, 6)


def encode_grey(grey: np.ndarray) -> bytes:
    """(H, W) uint8, top row first → PNG bytes (8-bit greyscale, no filtering)."""
    if grey.ndim != 2 or grey.dtype != np.uint8:
        raise ValueError("encode_grey needs (H, W) uint8 pixels")
    return _encode(np.ascontiguousarray(grey), grey.shape[1], 0)


def _encode(rows: np.ndarray, width: int, color_type: int) -> bytes:
    """Rows of samples (H, W × channels) → an 8-bit PNG of that colour type."""
    height = rows.shape[0]
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))


def matte_grey(rgba: np.ndarray) -> np.ndarray:
    """A rendered matte (H, W, 4) uint8 → its grey levels (H, W) uint8, white = subject:

        g = round(max(R, G, B) · A / 255)

    the brightest channel over black, so a transparent pixel is no subject whatever
    colour it holds (a mask strip renders white on black, a matte may be transparent)."""
    brightest = rgba[..., :3].max(axis=-1).astype(np.float32)
    return np.rint(brightest * rgba[..., 3] / 255.0).astype(np.uint8)


def layer_over_source(composite: np.ndarray, source: np.ndarray) -> np.ndarray:
    """The result layer that, laid over the source with its alpha, gives the composite.

    composite (H, W, 4) uint8: C = m·gen + (1 − m)·src in RGB (the server's result)
    and α = 255·m, the feathered region; source (H, W, ≥3) uint8: src. Over the source
    a straight-alpha layer (S, α) shows m·S + (1 − m)·src, so the layer's colour is

        S = (C − (1 − m)·src) / m   where m > 0   (= gen, to within rounding),

    and anything where m = 0 (there the layer is transparent and the source shows, as
    in the composite). Laying C itself with alpha m would mix the feathered edge twice."""
    weight = composite[..., 3:4].astype(np.float32) / 255.0
    mixed = composite[..., :3].astype(np.float32)
    plate = source[..., :3].astype(np.float32)
    layer = np.where(weight > 0, (mixed - (1 - weight) * plate) / np.maximum(weight, 1e-6), 0)
    out = composite.copy()
    out[..., :3] = np.clip(np.rint(layer), 0, 255).astype(np.uint8)
    return out
