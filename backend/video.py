"""Video in and out: read clips, choose frames, resize, retime, write.

Frames are numpy arrays shaped (F, H, W, 3), dtype uint8, RGB, everywhere in the
project; this module is the only place that talks to imageio.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from backend.errors import BadClipError
from shared.settings import TransferSettings

if TYPE_CHECKING:
    from shared.settings import TransferSettings

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".gif", ".avi"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
MAX_CLIP_FRAMES = 5000
MIN_SIDE, MAX_SIDE = 16, 8192
DEFAULT_FPS = 24.0


@dataclass
class Clip:
    frames: np.ndarray  # (N, H, W, 3) uint8
    fps: float


def read_clip(path: str | Path) -> Clip:
    """Read a video file or a folder of numbered PNG/JPG frames.

    Raises BadClipError with one sentence for anything unusable.
    """
    path = Path(path)
    if not path.exists():
        raise BadClipError(f"There is no clip at {path}; check the path.")
    if path.is_dir():
        frames, fps = _read_frame_folder(path), DEFAULT_FPS
    elif path.suffix.lower() in VIDEO_SUFFIXES:
        frames, fps = _read_video_file(path)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        raise BadClipError(
            f"{path.name} is a single image; give a video or the folder that holds its frames."
        )
    else:
        raise BadClipError(
            f"{path.name} is not a supported clip; use mp4, mov, mkv, webm, gif or a folder "
            f"of numbered png/jpg frames."
        )
    return Clip(frames=check_frames(frames, str(path)), fps=fps)


def check_frames(frames: np.ndarray | list, source: str = "the clip") -> np.ndarray:
    """Validate and normalise frames to (N, H, W, 3) uint8."""
    if len(frames) == 0:
        raise BadClipError(f"{source} has no frames; give a clip with at least 2 frames.")
    frames = np.asarray(frames)
    if frames.ndim == 3:  # greyscale
        frames = np.repeat(frames[..., None], 3, axis=-1)
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
        raise BadClipError(f"{source} does not hold RGB frames (shape {frames.shape}).")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    frames = frames[..., :3]
    if frames.dtype != np.uint8:
        if np.issubdtype(frames.dtype, np.floating) and frames.max(initial=0) <= 1.0:
            frames = frames * 255.0
        frames = np.clip(frames, 0, 255).astype(np.uint8)
    if len(frames) < 2:
        raise BadClipError(f"{source} has only 1 frame; motion transfer needs at least 2.")
    height, width = frames.shape[1:3]
    if not (MIN_SIDE <= height <= MAX_SIDE and MIN_SIDE <= width <= MAX_SIDE):
        raise BadClipError(
            f"{source} is {width}×{height}; each side must be between {MIN_SIDE} and "
            f"{MAX_SIDE} pixels."
        )
    return frames


def _read_video_file(path: Path) -> tuple[np.ndarray, float]:
    import imageio.v3 as iio

    try:
        meta = iio.immeta(path)
        fps = float(meta.get("fps") or 0) or _fps_from_duration(meta) or DEFAULT_FPS
        frames = []
        for frame in iio.imiter(path):
            frames.append(_to_rgb(frame))
            if len(frames) > MAX_CLIP_FRAMES:
                raise BadClipError(
                    f"{path.name} has more than {MAX_CLIP_FRAMES} frames; trim it first."
                )
    except BadClipError:
        raise
    except Exception as error:  # imageio raises many types for broken files
        raise BadClipError(
            f"Could not read {path.name} as a video ({type(error).__name__}); check that the "
            f"file is complete and in a supported format."
        ) from error
    if not frames:
        raise BadClipError(f"{path.name} has no frames; give a clip with at least 2 frames.")
    return np.stack(frames), fps


def _fps_from_duration(meta: dict) -> float:
    duration = meta.get("duration")  # gif: milliseconds per frame
    if isinstance(duration, int | float) and duration > 0:
        return 1000.0 / duration
    return 0.0


def _to_rgb(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        return np.repeat(frame[..., None], 3, axis=-1)
    return frame[..., :3]


def _read_frame_folder(folder: Path) -> np.ndarray:
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise BadClipError(f"The folder {folder} holds no png or jpg frames.")
    if len(files) > MAX_CLIP_FRAMES:
        raise BadClipError(f"{folder} has more than {MAX_CLIP_FRAMES} frames; trim it first.")
    files.sort(key=_frame_number_key)
    frames = []
    for file in files:
        try:
            with Image.open(file) as image:
                frames.append(np.asarray(image.convert("RGB")))
        except Exception as error:
            raise BadClipError(f"Could not read frame {file.name} in {folder}; replace or remove it.") from error
    if len({frame.shape for frame in frames}) > 1:
        raise BadClipError(f"The frames in {folder} differ in size; give frames of one size.")
    return np.stack(frames)


def _frame_number_key(path: Path) -> tuple:
    numbers = re.findall(r"\d+", path.stem)
    return (int(numbers[-1]) if numbers else -1, path.name)


def sample_indices(clip_length: int, count: int, start: int | None = None) -> np.ndarray:
    """Which clip frames feed the model.

    start None: `count` frames spread evenly over the whole clip,
    i_k = round(k·(N−1)/(count−1)). Otherwise the contiguous range start … start+count−1.
    """
    if start is None:
        if clip_length < count:
            raise BadClipError(
                f"The clip has {clip_length} frames but {count} are needed; use a longer clip "
                f"or ask for at most {clip_length} frames."
            )
        return np.round(np.linspace(0, clip_length - 1, count)).astype(np.int64)
    if start + count > clip_length:
        raise BadClipError(
            f"Frames {start}…{start + count - 1} were asked for but the clip has {clip_length} "
            f"frames (0…{clip_length - 1}); lower the start or the frame count."
        )
    return np.arange(start, start + count, dtype=np.int64)


def frames_to_edit(settings: TransferSettings, clip_length: int) -> int:
    """How many frames the model edits: `num_frames` if set, else the whole clip; never
    more than the frame limit (BadClipError with one sentence)."""
    limit = settings.frame_limit
    count = settings.num_frames if settings.num_frames is not None else clip_length
    if count > limit:
        raise BadClipError(
            f"{count} frames is more than the limit of {limit} frames per edit; trim the clip, "
            f"ask for fewer frames (--frames {limit} samples it evenly) or raise the limit "
            f"with --frame-limit."
        )
    return count


def resize_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize every frame to width×height (no crop; the reference stretches too)."""
    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack(
        [np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in frames]
    )


def retime_indices(count_in: int, count_out: int) -> np.ndarray:
    """Hold retiming: output frame i shows input frame floor(i·count_in/count_out)."""
    return (np.arange(count_out) * count_in) // count_out


def retime_frames(frames: np.ndarray, count_out: int) -> np.ndarray:
    """Stretch or squeeze a clip to `count_out` frames by holding frames (no blending)."""
    if count_out == len(frames):
        return frames
    return frames[retime_indices(len(frames), count_out)]


def write_video(frames: np.ndarray, path: str | Path, fps: float = DEFAULT_FPS) -> None:
    """Write an H.264 mp4 (or whatever the suffix says imageio can write)."""
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, frames, fps=fps, codec="libx264", macro_block_size=8)


def write_frames_dir(frames: np.ndarray, folder: str | Path) -> list[Path]:
    """Write numbered PNGs 00000.png, 00001.png, … and return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, frame in enumerate(frames):
        path = folder / f"{index:05d}.png"
        Image.fromarray(frame).save(path)
        paths.append(path)
    return paths


def contact_sheet(frames: list[np.ndarray], labels: list[str], columns: int,
                  least_width: int = 192) -> np.ndarray:
    """One labelled frame per take on a grid: frames (H, W, 3) uint8 of one size, each under
    a strip with its label (PIL's default font, cut at the frame's edge), `columns` to a
    row, left to right then top to bottom. Frames narrower than `least_width` are
    enlarged by a whole factor (nearest neighbour) so a label can be read. Returns
    (rows·(h + strip), columns·w, 3) uint8, black where no take is."""
    from PIL import ImageDraw

    scale = max(1, -(-least_width // frames[0].shape[1]))
    height, width = frames[0].shape[0] * scale, frames[0].shape[1] * scale
    strip = 14
    rows = -(-len(frames) // columns)
    sheet = Image.new("RGB", (columns * width, rows * (height + strip)))
    for index, (frame, label) in enumerate(zip(frames, labels, strict=True)):
        cell = Image.new("RGB", (width, height + strip))
        cell.paste(Image.fromarray(frame).resize((width, height), Image.NEAREST), (0, strip))
        ImageDraw.Draw(cell).text((2, 1), label, fill=(255, 255, 255))
        sheet.paste(cell, ((index % columns) * width, (index // columns) * (height + strip)))
    return np.asarray(sheet)


def encode_png(frame: np.ndarray) -> bytes:
    """One (H, W, 3) uint8 frame → PNG bytes (fast, lossless compression)."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_pngs(images: list[bytes], source: str = "the frames") -> np.ndarray:
    """PNG bytes (all one size) → (F, H, W, 3) uint8 RGB; BadClipError for anything
    unreadable. Use check_frames on it when it is a clip to edit."""
    import io

    frames = []
    for index, data in enumerate(images):
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.format != "PNG":
                    raise ValueError(image.format)
                frames.append(np.asarray(image.convert("RGB")))
        except Exception as error:  # Pillow raises many types for broken images
            raise BadClipError(
                f"Frame {index} of {source} is not a readable PNG ({type(error).__name__}); "
                "send PNG-encoded frames.") from None
    if not frames:
        raise BadClipError(f"{source} has no frames; send at least one.")
    if len({frame.shape for frame in frames}) > 1:
        raise BadClipError(f"The frames of {source} differ in size; send frames of one size.")
    return np.stack(frames)
