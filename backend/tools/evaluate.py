"""`python -m backend evaluate`: score a result clip against its source clip.

The steps, top to bottom: bring both clips to one frame count and one size, track a
grid of points in each, score motion fidelity (backend/tools/metrics.py, paper Eq. 5),
score edit fidelity with CLIP if a CLIP model can be loaded, and draw a picture of
the tracks. `evaluate_clips` returns the JSON report; the command line prints it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from backend.errors import ModelNotFoundError
from backend.tools import metrics, tracking
from backend.video import resize_frames, sample_indices

PICTURE_TRACKS = 150  # tracks drawn per side: enough to see the motion, few enough to read
PICTURE_MIN_HEIGHT = 256  # pixels; smaller clips are enlarged so the tracks stay visible


def match_clips(source: np.ndarray, result: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bring both clips to the same frame count and size.

    Frame count: the longer clip is sampled evenly down to the shorter one's count with
    `sample_indices`, the same rule the engine uses to pick the frames it edits, so a
    result made from a longer source lines up with the source frames it came from.
    Size: both are resized (stretched, as the engine does) to the smaller clip's size
    by area, so tracking never runs on upscaled pixels.
    """
    count = min(len(source), len(result))
    source = source[sample_indices(len(source), count)]
    result = result[sample_indices(len(result), count)]
    height, width = min(source.shape[1:3], result.shape[1:3], key=lambda hw: hw[0] * hw[1])
    return resize_frames(source, width, height), resize_frames(result, width, height)


@dataclass
class Evaluation:
    report: dict  # JSON-ready: frames, size, motion_fidelity, edit_fidelity
    source: np.ndarray  # the clips as compared: same frame count and size
    result: np.ndarray
    source_tracks: tracking.Tracks
    result_tracks: tracking.Tracks


def evaluate_clips(source: np.ndarray, result: np.ndarray, prompt: str,
                   clip_model: str | None = metrics.DEFAULT_CLIP_MODEL,
                   tracker_checkpoint: str | Path | None = None,
                   grid: int = tracking.DEFAULT_GRID, device: str | None = None) -> Evaluation:
    """Score `result` against `source` (both (F, H, W, 3) uint8).

    A CLIP model that cannot be loaded skips edit fidelity (the report says why)
    instead of failing the whole evaluation; clip_model None skips it too.
    """
    tracking.check_grid(grid)
    frames_in = {"source": len(source), "result": len(result)}
    source, result = match_clips(source, result)
    source_tracks = tracking.track(source, grid, tracker_checkpoint, device)
    result_tracks = tracking.track(result, grid, tracker_checkpoint, device)
    report = {
        "frames": {**frames_in, "compared": len(source)},
        "size": {"width": int(source.shape[2]), "height": int(source.shape[1])},
        "motion_fidelity": score_motion(source_tracks, result_tracks),
        "edit_fidelity": score_edit(result, prompt, clip_model, device),
    }
    return Evaluation(report, source, result, source_tracks, result_tracks)


def score_motion(source_tracks: tracking.Tracks, result_tracks: tracking.Tracks) -> dict:
    """Motion fidelity as a report section, named by its tracker.

    {"skipped": reason} when one clip kept no track at all (a texture-less or pure
    noise clip under Lucas–Kanade): there is then no motion to compare.
    """
    section = {
        "tracker": source_tracks.tracker,
        "grid": source_tracks.grid,
        "tracks": {"seeded": source_tracks.seeded, "source": len(source_tracks.points),
                   "result": len(result_tracks.points)},
        "still_px": metrics.STILL_PX,
    }
    empty = [name for name, tracks in (("source", source_tracks), ("result", result_tracks))
             if len(tracks.points) == 0]
    if empty:
        return {"skipped": f"No point of the {' and '.join(empty)} clip could be tracked "
                           f"through every frame, so there is no motion to compare.", **section}
    return {**metrics.motion_fidelity_both(source_tracks.points, result_tracks.points),
            **section}


def score_edit(frames: np.ndarray, prompt: str, clip_model: str | None,
               device: str | None) -> dict:
    """Edit fidelity as a report section; {"skipped": reason} when CLIP is unavailable."""
    if not clip_model:
        return {"skipped": "No CLIP model was asked for (--clip-model none).", "prompt": prompt}
    try:
        clip, processor, device = metrics.load_clip_model(clip_model, device)
    except ModelNotFoundError as error:
        return {"skipped": str(error), "clip_model": str(clip_model), "prompt": prompt}
    cosines = metrics.clip_frame_text_cosines(frames, prompt, clip, processor, device)
    return {"score": float(cosines.mean()), "clip_model": str(clip_model), "prompt": prompt,
            "per_frame": [round(float(value), 6) for value in cosines]}


def format_table(report: dict) -> str:
    """A short human-readable summary of the report."""
    motion, edit = report["motion_fidelity"], report["edit_fidelity"]
    tracks = motion["tracks"]
    lines = [
        f"frames compared   {report['frames']['compared']} "
        f"(source {report['frames']['source']}, result {report['frames']['result']}) "
        f"at {report['size']['width']}×{report['size']['height']}",
        f"tracker           {motion['tracker']}, grid {motion['grid']}×{motion['grid']}, "
        f"kept {tracks['source']}/{tracks['seeded']} source and "
        f"{tracks['result']}/{tracks['seeded']} result tracks",
    ]
    if "mean" in motion:
        lines.append(f"motion fidelity   result→source {motion['result_to_source']:.4f}   "
                     f"source→result {motion['source_to_result']:.4f}   mean {motion['mean']:.4f}")
    else:
        lines.append(f"motion fidelity   skipped: {motion['skipped']}")
    if "score" in edit:
        lines.append(f"edit fidelity     {edit['score']:.4f} (CLIP {edit['clip_model']})")
    else:
        lines.append(f"edit fidelity     skipped: {edit['skipped']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- picture


def track_colours(tracks: np.ndarray) -> np.ndarray:
    """One RGB colour per track, hue from where it starts (left→right), so neighbours
    share colours and the eye can follow a region. Returns (N, 3) uint8."""
    import cv2

    x = tracks[:, 0, 0]
    span = max(float(x.max() - x.min()), 1e-6)
    hue = ((x - x.min()) / span * 150).astype(np.uint8)  # OpenCV hue runs 0…179
    hsv = np.stack([hue, np.full_like(hue, 255), np.full_like(hue, 255)], axis=-1)
    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]


def draw_tracks(frame: np.ndarray, tracks: np.ndarray, label: str,
                count: int = PICTURE_TRACKS) -> np.ndarray:
    """The frame with up to `count` tracks drawn as lines ending in a dot."""
    import cv2

    canvas = np.ascontiguousarray(frame.copy())
    if len(tracks):
        chosen = tracks[np.unique(np.linspace(0, len(tracks) - 1, count).round().astype(int))]
        for track, colour in zip(chosen, track_colours(chosen), strict=True):
            colour = tuple(int(c) for c in colour)
            line = np.round(track).astype(np.int32).reshape(-1, 1, 2)
            cv2.polylines(canvas, [line], False, colour, 1, cv2.LINE_AA)
            cv2.circle(canvas, tuple(int(v) for v in line[-1, 0]), 2, colour, -1, cv2.LINE_AA)
    for colour, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):  # outlined: readable anywhere
        cv2.putText(canvas, label, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, thickness,
                    cv2.LINE_AA)
    return canvas


def save_picture(path: str | Path, source: np.ndarray, result: np.ndarray,
                 source_tracks: np.ndarray, result_tracks: np.ndarray) -> Path:
    """PNG: the last source frame and the last result frame side by side, each with a
    sample of its own tracks drawn over it. Small clips are enlarged by a whole factor
    (pixels repeated) so that the picture is at least PICTURE_MIN_HEIGHT tall."""
    import cv2

    path = Path(path)
    height, width = source.shape[1:3]
    scale = -(-PICTURE_MIN_HEIGHT // height)  # ceiling division; 1 for clips tall enough
    size = (width * scale, height * scale)
    sides = [draw_tracks(cv2.resize(frames[-1], size, interpolation=cv2.INTER_NEAREST),
                         tracks * scale, label)
             for frames, tracks, label in ((source, source_tracks, "source"),
                                           (result, result_tracks, "result"))]
    gap = np.full((size[1], 4, 3), 255, dtype=np.uint8)
    picture = np.concatenate([sides[0], gap, sides[1]], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path, format="PNG")
    return path
