"""Quality measures for a motion transfer, as the paper measures them (docs/method.md, "Measuring results").

Motion fidelity (paper Eq. 5) compares point tracks of the source clip with point
tracks of the result; edit fidelity compares every result frame with the target
prompt through CLIP. Both are plain functions of arrays; tracking itself lives in
backend/tools/tracking.py and the command in backend/cli.py (`python -m backend evaluate`).

Tracks are numpy arrays shaped (N, F, 2): N points, F frames, (x, y) in pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backend.errors import BadClipError, ModelNotFoundError

# A per-frame displacement shorter than this (pixels) counts as "the point stands
# still". 0.01 px is far below what any tracker resolves, so it only absorbs
# floating-point noise and sub-resolution jitter.
STILL_PX = 0.01

# Rows of the N×M correlation matrix computed at once: 1024 × 3025 float32 is 12 MB.
CHUNK_ROWS = 1024

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


# --------------------------------------------------------------------------- motion fidelity


def displacement_codes(tracks: np.ndarray, still_px: float = STILL_PX) -> np.ndarray:
    """Per-frame displacements as 3-vectors whose dot products are the Eq. 5 cosines.

    For track τ and frame step t, d_t = τ_{t+1} − τ_t. The code is
        c_t = (d_t / |d_t|, 0)   if |d_t| > still_px   (a moving point)
        c_t = (0, 0, 1)          otherwise             (a point standing still)
    so c_t · c̃_t = cos(d_t, d̃_t) when both move, 1 when both stand still, and 0 when
    exactly one moves: standing still matches standing still perfectly and matches no
    direction of motion. Nothing is ever divided by zero.

    Returns (N, F−1, 3) float32.
    """
    tracks = check_tracks(tracks)
    steps = np.diff(tracks.astype(np.float64), axis=1)  # (N, F−1, 2)
    length = np.linalg.norm(steps, axis=-1, keepdims=True)
    moving = length > still_px
    unit = np.where(moving, steps / np.where(moving, length, 1.0), 0.0)
    still = (~moving).astype(np.float64)
    return np.concatenate([unit, still], axis=-1).astype(np.float32)


def check_tracks(tracks: np.ndarray) -> np.ndarray:
    """Accept (N, F, 2) arrays with N ≥ 1 and F ≥ 2; anything else is a clear error."""
    tracks = np.asarray(tracks)
    if tracks.ndim != 3 or tracks.shape[-1] != 2:
        raise BadClipError(f"Tracks must be shaped (points, frames, 2), not {tracks.shape}.")
    if tracks.shape[0] == 0:
        raise BadClipError("No point could be tracked; give a clip with visible texture.")
    if tracks.shape[1] < 2:
        raise BadClipError("Tracks need at least 2 frames to have motion.")
    return tracks


def best_match_means(source_tracks: np.ndarray, result_tracks: np.ndarray,
                     still_px: float = STILL_PX) -> tuple[float, float]:
    """The two directions of Eq. 5, computed in row chunks so N×M never sits in memory.

    corr(τ, τ̃) = 1/(F−1) · Σ_t c_t · c̃_t        (mean over frames of the cosine)
    result_to_source = mean over result tracks τ̃ of max over source tracks τ of corr
    source_to_result = mean over source tracks τ of max over result tracks τ̃ of corr

    Returns (result_to_source, source_to_result). The authors' code reports the first.
    """
    source = displacement_codes(source_tracks, still_px)
    result = displacement_codes(result_tracks, still_px)
    if source.shape[1] != result.shape[1]:
        raise BadClipError(
            f"The source tracks span {source.shape[1] + 1} frames and the result tracks "
            f"{result.shape[1] + 1}; track the same number of frames in both."
        )
    steps = source.shape[1]
    source_flat = source.reshape(len(source), -1)  # (N, 3·(F−1))
    result_flat = result.reshape(len(result), -1)  # (M, 3·(F−1))

    best_for_result = np.full(len(result), -np.inf, dtype=np.float32)
    best_for_source = np.empty(len(source), dtype=np.float32)
    for start in range(0, len(source), CHUNK_ROWS):
        corr = source_flat[start:start + CHUNK_ROWS] @ result_flat.T / steps  # (n, M)
        best_for_source[start:start + len(corr)] = corr.max(axis=1)
        np.maximum(best_for_result, corr.max(axis=0), out=best_for_result)
    return float(best_for_result.mean()), float(best_for_source.mean())


def motion_fidelity_both(source_tracks: np.ndarray, result_tracks: np.ndarray,
                         still_px: float = STILL_PX) -> dict[str, float]:
    """Both directions of paper Eq. 5 and their mean, as a JSON-ready dict.

    {"result_to_source": …, "source_to_result": …, "mean": …}; each lies in [−1, 1]
    and is 1 when every track has a perfectly matching partner in the other set.
    """
    result_to_source, source_to_result = best_match_means(source_tracks, result_tracks,
                                                          still_px)
    return {
        "result_to_source": result_to_source,
        "source_to_result": source_to_result,
        "mean": (result_to_source + source_to_result) / 2.0,
    }


def motion_fidelity(source_tracks: np.ndarray, result_tracks: np.ndarray,
                    still_px: float = STILL_PX) -> float:
    """Motion fidelity (paper Eq. 5): the mean of its two directions.

    score = ½ · [ mean_τ̃ max_τ corr(τ, τ̃) + mean_τ max_τ̃ corr(τ, τ̃) ]
    with corr(τ, τ̃) the mean over frames of the cosine between the per-frame
    displacement vectors (see `displacement_codes` for points standing still).
    """
    return motion_fidelity_both(source_tracks, result_tracks, still_px)["mean"]


# --------------------------------------------------------------------------- edit fidelity


def load_clip_model(model: str | Path, device: str | None = None):
    """Load a CLIP model and its processor by hub id or local folder.

    The Hugging Face cache is tried first, so a cached model works offline; then the
    hub (which honours HF_HUB_OFFLINE). Raises ModelNotFoundError with one sentence.
    Returns (model, processor, device).
    """
    import torch
    from transformers import CLIPModel, CLIPProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    errors = []
    for local_only in (True, False):
        try:
            clip = CLIPModel.from_pretrained(str(model), local_files_only=local_only)
            processor = CLIPProcessor.from_pretrained(str(model), local_files_only=local_only)
            return clip.to(device).eval(), processor, device
        except Exception as error:  # missing files, no network, wrong layout: many types
            errors.append(error)
            if Path(str(model)).exists():
                break  # a local folder that fails will not load from the hub either
    raise ModelNotFoundError(
        f"The CLIP model {model} is neither a usable local folder nor in the Hugging Face "
        f"cache and could not be downloaded ({type(errors[-1]).__name__}); pass "
        f"--clip-model with a local CLIP folder or download it once with internet."
    )


def clip_frame_text_cosines(frames: np.ndarray, prompt: str, clip, processor,
                            device: str = "cpu", batch: int = 16) -> np.ndarray:
    """CLIP cosine similarity between each frame and the prompt, one value per frame.

    cos_f = ⟨I(frame_f), T(prompt)⟩ / (‖I(frame_f)‖ ‖T(prompt)‖), with I and T CLIP's
    projected image and text embeddings. Frames are (F, H, W, 3) uint8 RGB.
    """
    import torch

    max_tokens = clip.config.text_config.max_position_embeddings
    cosines = []
    with torch.no_grad():
        for start in range(0, len(frames), batch):
            images = [frame for frame in frames[start:start + batch]]
            inputs = processor(text=[prompt], images=images, return_tensors="pt",
                               padding=True, truncation=True, max_length=max_tokens)
            output = clip(**{name: value.to(device) for name, value in inputs.items()})
            image = torch.nn.functional.normalize(output.image_embeds.float(), dim=-1)
            text = torch.nn.functional.normalize(output.text_embeds.float(), dim=-1)
            cosines.append((image @ text.T)[:, 0].cpu().numpy())
    return np.concatenate(cosines)


def edit_fidelity(frames: np.ndarray, prompt: str, clip, processor,
                  device: str = "cpu") -> float:
    """Edit fidelity: the mean over frames of the CLIP frame–prompt cosine."""
    return float(clip_frame_text_cosines(frames, prompt, clip, processor, device).mean())
