"""The little PNG work the extension does itself: sizes, alpha, writing RGBA frames.

The server returns RGB frames; where the source showed nothing (a text strip, a
picture-in-picture scene) the result keeps the source's transparency, so the
extension puts the source render's alpha into the result frames. Decoding is done by
Blender (strip_io); this module resizes the alpha and encodes PNGs with the standard
library and numpy (both in every Blender), so it is tested without Blender.
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
    rows = np.concatenate([np.zeros((height, 1), np.uint8),
                           np.ascontiguousarray(pixels).reshape(height, width * 4)], axis=1)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))
