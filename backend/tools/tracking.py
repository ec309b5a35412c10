"""Point trackers for motion fidelity: a grid of points followed through a clip.

Every tracker returns `Tracks`: points shaped (N, F, 2) in pixels, (x, y), plus the
tracker's name so reports can say which tracker produced their numbers (scores from
different trackers are not comparable).

- `track_lucas_kanade`: OpenCV pyramidal Lucas–Kanade with a forward–backward check;
  the default, needs nothing beyond opencv-python-headless.
- `track_cotracker`: CoTracker v3 offline from a local checkpoint, as the paper's
  authors measure (55×55 grid); needs the `cotracker` package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backend.errors import BadSettingsError, ModelNotFoundError

DEFAULT_GRID = 55  # the paper's CoTracker grid: 55×55 points
MIN_GRID, MAX_GRID = 2, 200
FB_THRESHOLD_PX = 1.0  # forward–backward round trip error a kept track may show
LK_WINDOW = (21, 21)
LK_PYRAMID_LEVELS = 3


@dataclass
class Tracks:
    points: np.ndarray  # (N, F, 2) float32, x then y, pixels
    tracker: str  # which tracker produced them, e.g. "opencv-lucas-kanade"
    grid: int  # seeds were a grid×grid lattice
    seeded: int  # how many points were seeded (points kept ≤ seeded)


def check_grid(grid: int) -> int:
    if not MIN_GRID <= grid <= MAX_GRID:
        raise BadSettingsError(f"--grid is {grid}; give a value from {MIN_GRID} to {MAX_GRID}.")
    return grid


def grid_points(width: int, height: int, grid: int) -> np.ndarray:
    """grid×grid points evenly spread over the frame, kept off the border.

    The margin is 1/64 of each side (as CoTracker's grid does) so no seed starts on
    the edge, where neither tracker has context. Returns (grid², 2) float32 (x, y).
    """
    margin_x, margin_y = width / 64, height / 64
    xs = np.linspace(margin_x, width - 1 - margin_x, grid)
    ys = np.linspace(margin_y, height - 1 - margin_y, grid)
    x, y = np.meshgrid(xs, ys)
    return np.stack([x.ravel(), y.ravel()], axis=-1).astype(np.float32)


# --------------------------------------------------------------------------- Lucas–Kanade


def track_lucas_kanade(frames: np.ndarray, grid: int = DEFAULT_GRID,
                       fb_threshold: float = FB_THRESHOLD_PX) -> Tracks:
    """Follow a grid of points from the first frame with pyramidal Lucas–Kanade.

    At every frame step each point is tracked forward (t → t+1) and the answer back
    again (t+1 → t). A track is kept only if, at every step, OpenCV reports success
    both ways, the round trip lands within `fb_threshold` pixels of where it started,
    and the point stays inside the frame. Failing tracks are dropped whole (Eq. 5
    compares whole tracks), so the result holds N ≤ grid² tracks; `seeded` says how
    many were tried. Frames are (F, H, W, 3) uint8 RGB.
    """
    import cv2

    check_grid(grid)
    height, width = frames.shape[1:3]
    grey = [cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY) for frame in frames]
    lk = dict(winSize=LK_WINDOW, maxLevel=LK_PYRAMID_LEVELS,
              criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01))

    points = grid_points(width, height, grid)
    path = [points]
    alive = np.ones(len(points), dtype=bool)
    for before, after in zip(grey[:-1], grey[1:], strict=True):
        current = path[-1].reshape(-1, 1, 2)
        forward, ok_forward, _ = cv2.calcOpticalFlowPyrLK(before, after, current, None, **lk)
        back, ok_back, _ = cv2.calcOpticalFlowPyrLK(after, before, forward, None, **lk)
        forward, back = forward.reshape(-1, 2), back.reshape(-1, 2)
        round_trip = np.linalg.norm(back - path[-1], axis=-1)
        inside = ((forward[:, 0] >= 0) & (forward[:, 0] <= width - 1)
                  & (forward[:, 1] >= 0) & (forward[:, 1] <= height - 1))
        alive &= (ok_forward.ravel() == 1) & (ok_back.ravel() == 1) & inside
        alive &= round_trip < fb_threshold
        path.append(forward)
    tracks = np.stack(path, axis=1)[alive].astype(np.float32)
    return Tracks(points=tracks, tracker="opencv-lucas-kanade (forward-backward checked)",
                  grid=grid, seeded=len(points))


# --------------------------------------------------------------------------- CoTracker


def track_cotracker(frames: np.ndarray, checkpoint: str | Path, grid: int = DEFAULT_GRID,
                    device: str | None = None) -> Tracks:
    """Follow a grid of points with CoTracker v3 offline loaded from a local checkpoint.

    All grid² tracks are kept (CoTracker tracks through occlusions), as the paper's
    authors do. torch.hub is not used: nothing is downloaded.
    """
    import torch

    check_grid(grid)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ModelNotFoundError(
            f"There is no CoTracker checkpoint at {checkpoint}; give the path of "
            f"scaled_offline.pth."
        )
    try:
        from cotracker.predictor import CoTrackerPredictor
    except ImportError as error:
        raise ModelNotFoundError(
            "CoTracker is not installed; install it with `pip install "
            "git+https://github.com/facebookresearch/co-tracker` or drop --tracker-checkpoint "
            "to use the Lucas–Kanade tracker."
        ) from error
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = CoTrackerPredictor(checkpoint=str(checkpoint), offline=True, v2=False,
                                   window_len=60)
    except Exception as error:  # wrong file, wrong version: torch raises many types
        raise ModelNotFoundError(
            f"{checkpoint.name} is not a CoTracker v3 offline checkpoint "
            f"({type(error).__name__}); give scaled_offline.pth."
        ) from error
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)[None].float()
    with torch.no_grad():
        tracks, _visibility = model.to(device)(video.to(device), grid_size=grid)
    points = tracks[0].permute(1, 0, 2).cpu().numpy().astype(np.float32)  # (N, F, 2)
    return Tracks(points=points, tracker=f"cotracker3-offline ({checkpoint.name})",
                  grid=grid, seeded=grid * grid)


def track(frames: np.ndarray, grid: int = DEFAULT_GRID, checkpoint: str | Path | None = None,
          device: str | None = None) -> Tracks:
    """CoTracker when a checkpoint is given, Lucas–Kanade otherwise."""
    if checkpoint is not None:
        return track_cotracker(frames, checkpoint, grid=grid, device=device)
    return track_lucas_kanade(frames, grid=grid)
