"""Regions: change only the subject, keep the plate (docs/method.md, "Regions").

A region is one per-frame mask of the clip (white = subject), given as a video, a folder
of numbered PNGs, or one PNG for every frame (`--mask`, repeatable: one region each).
An edit's masks travel as `RegionMasks` (backend/results.py): (R, N, H, W) grey levels
(uint8 0…255, or float in [0, 1]) at the clip's resolution. A pixel belongs to the region
where its value is at least ½ of white (`binary`, backend/masks.py inside), so compression
noise in a black mask is no region; the soft edge is ours (`feather`). Only the
region's pixels matter, so an edit reads each frame's masks once, as bools, one frame
at a time (`prepare_regions`), and keeps m exactly in whole counts (`Plate`).

Notation (docs/method.md):

    M_r        region r's binary mask, (F, H, W) at the source's resolution
    U          the union of the regions, max_r M_r
    G          U grown by g px (`region_grow`): a square dilation
    m          G feathered by f px (`region_feather`), inside G only: m = 0 outside G
    m_lat      m at latent resolution (area mean per latent cell, max per latent frame)
    w_r        region r's weights at a feature tap's resolution (area mean of M_r)
    φ_r        region r's masked SMM, (F, D)

Pieces, each a small pure function:

    grow          G = dilate(U, g)                  (square, g px; running sums, O(1) a pixel)
    feather       m = box_r(erode_r(G)),  r = ⌈f/2⌉                 (0 outside G, exactly)
    masked_smm    φ_r[f, d] = Σ_{y,x} w_r[f,y,x]·F[f,d,y,x] / Σ_{y,x} w_r[f,y,x]
    regions_loss  L = Σ_r L_pair(φ_r over the frames where region r is present)
    blend_latents z = m_lat·z_gen + (1 − m_lat)·z_src(t)
    composite     out = m·gen + (1 − m)·source                      (source resolution)

The checks (backend/masks.py, no torch) are the one place a mask is
refused; the command line, the server and the engine all call them, so each failure is
the same one sentence.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as functional

from backend.masks import REGION_THRESHOLD
from backend.memory.counter import values_unknown
from backend.method.guidance import pairwise_smm_loss
from shared.settings import MOTIONS

# --------------------------------------------------------------------------- reading and checks:
# backend/masks.py (no torch there: the server's front imports them).

# --------------------------------------------------------------------------- grow, feather, resample


def binary(masks: torch.Tensor) -> torch.Tensor:
    """M = [mask ≥ ½] as float (0 or 1), any shape."""
    return (masks >= REGION_THRESHOLD).to(torch.float32)


def box_count(mask: torch.Tensor, radius: int, pad_mode: str = "constant") -> torch.Tensor:
    """S[f,y,x] = Σ over the (2r+1)² square around (y, x) of a 0/1 mask, as int32, by
    running sums (O(1) a pixel whatever r, and exact: whole numbers). Beyond the frame
    the mask is 0 (`pad_mode` "constant") or its edge repeated ("replicate")."""
    counts = mask.to(torch.int32)
    if radius == 0:
        return counts
    kernel = 2 * radius + 1
    padded = functional.pad(counts[:, None].float(), (radius,) * 4, mode=pad_mode)[:, 0]
    padded = padded.to(torch.int32)
    for dim in (-1, -2):
        running = functional.pad(padded.cumsum(dim, dtype=torch.int32), (1, 0) if dim == -1 else (0, 0, 1, 0))
        length = running.shape[dim] - kernel
        padded = running.narrow(dim, kernel, length) - running.narrow(dim, 0, length)
    return padded


def grow(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """G = dilate(M, g): 1 wherever some pixel of M lies within g px (square, the
    Chebyshev distance ≤ g). (F, H, W) float {0, 1} → same."""
    if pixels == 0:
        return mask.clone()
    return (box_count(mask > 0, pixels) > 0).to(torch.float32)


def erode(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """erode(G, r) = 1 − dilate(1 − G, r): 1 where every pixel within r px is in G. Beyond
    the frame's edge counts as inside, so a subject that touches the frame's edge is
    not faded there."""
    return 1 - grow(1 - mask, pixels)


def box_blur(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean of a 0/1 mask over the (2r+1)² square around each pixel, the frame's edge
    replicated: a whole count over (2r+1)², so a pixel whose square holds only zeros
    stays exactly 0 and one whose square holds only ones is exactly 1."""
    if radius == 0:
        return mask.clone()
    return box_count(mask > 0, radius, "replicate").to(torch.float32) / (2 * radius + 1) ** 2


def feather(grown: torch.Tensor, pixels: int) -> torch.Tensor:
    """m = box_r(erode_r(G)), r = ⌈f/2⌉: a ramp of 2r + 1 px just inside G's edge.

    Exactly 0 outside G (a pixel outside G has no pixel of erode_r(G) within r px) and
    exactly 1 where G holds every pixel within 2r px. (F, H, W) → same, in [0, 1].
    """
    radius = math.ceil(pixels / 2)
    return box_blur(erode(grown, radius), radius).clamp_(0, 1)


def plate_mask(masks: torch.Tensor, grow_px: int, feather_px: int) -> torch.Tensor:
    """m = feather(grow(U, g), f), U = max_r M_r: where the result is generated (1), kept
    from the source (0) or mixed. masks (R, F, H, W) in [0, 1] → (F, H, W)."""
    union = binary(masks).amax(dim=0)
    return feather(grow(union, grow_px), feather_px)


def latent_frame_groups(pixel_frames: int, latent_frames: int) -> list[tuple[int, int]]:
    """The pixel frames [start, end) behind each latent frame.

    Equal counts (ZeroScope): one each. Otherwise a causal temporal VAE (Wan: N = 1 +
    s·(N' − 1), s = 4): latent frame 0 is pixel frame 0, latent frame k ≥ 1 is pixel
    frames 1 + s·(k − 1) … s·k.
    """
    if pixel_frames == latent_frames:
        return [(frame, frame + 1) for frame in range(pixel_frames)]
    stride, rest = divmod(pixel_frames - 1, max(latent_frames - 1, 1))
    if latent_frames < 2 or rest:
        raise ValueError(f"{pixel_frames} pixel frames do not fall evenly into {latent_frames} "
                         "latent frames")
    return [(0, 1)] + [(1 + stride * (k - 1), 1 + stride * k) for k in range(1, latent_frames)]


def to_latent(mask: torch.Tensor, latent_frames: int, size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask (..., F, H, W) at latent resolution (..., F', h, w), size = (w, h):
    the area mean over each latent cell, then the max over each latent frame's pixel
    frames (`latent_frame_groups`): a latent frame is free wherever any of its frames is."""
    lead, (frames, height, width) = mask.shape[:-3], mask.shape[-3:]
    planes = mask.reshape(-1, 1, height, width).float()
    planes = functional.interpolate(planes, size=(size[1], size[0]), mode="area")
    cells = planes.reshape(*lead, frames, size[1], size[0])
    groups = latent_frame_groups(frames, latent_frames)
    if len(groups) == frames:
        return cells
    return torch.stack([cells[..., start:end, :, :].amax(dim=-3) for start, end in groups], dim=-3)


def pad_frames(mask: torch.Tensor, frames: int) -> torch.Tensor:
    """(..., F, H, W) → (..., frames, H, W), repeating the last frame (as the engine pads
    the clip for the VAE)."""
    extra = frames - mask.shape[-3]
    if extra <= 0:
        return mask
    return torch.cat([mask, mask[..., -1:, :, :].expand(*mask.shape[:-3], extra, *mask.shape[-2:])],
                     dim=-3)


# --------------------------------------------------------------------------- masked SMM and its loss


def guidance_masks(masks: torch.Tensor | None, motion: str, like: tuple[int, ...]) -> torch.Tensor:
    """The masks whose motions guide the edit, (R', F, H, W):

    subject: the binary regions M_r, one each;
    camera:  the background 1 − U (one), or the whole frame (ones, shape `like` =
             (F, H, W)) when there is no region.
    """
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; use one of {MOTIONS}")
    if masks is None or len(masks) == 0:
        if motion == "subject":
            raise ValueError("subject motion needs at least one region")
        return torch.ones((1, *like))
    regions = binary(masks)
    if motion == "subject":
        return regions
    return 1 - regions.amax(dim=0, keepdim=True)


def weights_at(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """w: masks (R, F, H, W) as area means over a tap's cells, (R, F, h, w) with
    size = (h, w), the tap's spatial shape."""
    regions, frames, height, width = masks.shape
    planes = functional.interpolate(masks.reshape(regions * frames, 1, height, width).float(),
                                    size=size, mode="area")
    return planes.reshape(regions, frames, *size)


def masked_smm(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Masked spatial marginal mean of each region:

        φ_r[f, d] = Σ_{y,x} w_r[f,y,x]·F[f,d,y,x] / Σ_{y,x} w_r[f,y,x]      (0 where Σ w = 0)

    features (F, D, H, W), weights (R, F, H, W) → (R, F, D). With w ≡ 1 this is
    guidance.smm (the mean over all H·W cells).
    """
    weights = weights.to(features.dtype)
    total = weights.sum(dim=(-2, -1))  # (R, F)
    weighted = torch.einsum("rfyx,fdyx->rfd", weights, features)
    return weighted / total.clamp_min(torch.finfo(features.dtype).tiny)[..., None]


def present_frames(weights: torch.Tensor) -> torch.Tensor:
    """(R, F) bool: the frames in which region r has any weight at a tap's resolution.

    Under the memory plan (fake tensors, backend/memory/counter.py) the weights hold no
    values to say in which frames a region is: it is in all of them, the most the loss
    reads."""
    if values_unknown():
        return torch.ones(tuple(weights.shape[:2]), dtype=torch.bool)
    return weights.sum(dim=(-2, -1)) > 0


def regions_loss(source: torch.Tensor, target: torch.Tensor, present: torch.Tensor,
                 kind: str = "cosine") -> torch.Tensor:
    """L = Σ_r L_pair(φ_r, φ̃_r), each region's pairwise SMM loss (guidance.pairwise_smm_loss)
    over the frames where it is present; a region present in fewer than two frames has
    no motion to match and adds nothing.

    source, target (R, F, D) masked SMMs; present (R, F) bool. Returns a scalar tensor,
    differentiable in `target`.
    """
    total = target.new_zeros(())
    for region_source, region_target, frames in zip(source, target, present, strict=True):
        count = int(frames.sum())
        if count < 2:
            continue
        if count < len(frames):  # a region present throughout is read as it is (no copy)
            region_source, region_target = region_source[frames], region_target[frames]
        total = total + pairwise_smm_loss(region_source, region_target, kind)
    return total


# --------------------------------------------------------------------------- blend and composite


def blend_latents(generated: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """z = m_lat·z_gen + (1 − m_lat)·z_src(t): latents (B, C, F', h, w), mask (F', h, w).
    Where m_lat = 0 the result is z_src(t) exactly."""
    weight = mask.to(generated.device, generated.dtype)[None, None]
    return weight * generated + (1 - weight) * source.to(generated.dtype)


def composite(generated: np.ndarray, source: np.ndarray, mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """out = m·gen + (1 − m)·source, rounded: frames (F, H, W, 3) uint8 of one size, mask
    (F, H, W) in [0, 1]. Where m = 0 the output is the source's pixel exactly (0·gen +
    1·src is src in float32), where m = 1 the generated one."""
    weight = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, np.float32)[..., None]
    mixed = weight * generated.astype(np.float32) + (1 - weight) * source.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- one edit's regions


@dataclass
class Plate:
    """m (F, box h, box w), held exactly in the fewest bytes: m = c / (2r + 1)² with c the
    feather's whole box count (`feather`), so `counts` keeps c in the smallest integer
    type that holds (2r + 1)² (uint8 up to r = 7: the default feather's r = 4 gives 81),
    a quarter of float32's bytes, and `frame(f)` gives m[f] back bit for bit."""

    counts: torch.Tensor  # (F, box h, box w) uint8, int16 or int32
    divisor: int  # (2r + 1)²

    @classmethod
    def empty(cls, frames: int, size: tuple[int, int], feather_px: int) -> Plate:
        """A plate of `frames` frames of size = (h, w) for `feather_px`, to fill (`put`)."""
        divisor = (2 * math.ceil(feather_px / 2) + 1) ** 2
        dtype = next(t for t in (torch.uint8, torch.int16, torch.int32)
                     if divisor <= torch.iinfo(t).max)
        return cls(torch.empty((frames, *size), dtype=dtype), divisor)

    @classmethod
    def of(cls, feathered: torch.Tensor, feather_px: int) -> Plate:
        """Keep `feather(…, feather_px)`'s output m (F, h, w) exactly."""
        plate = cls.empty(len(feathered), tuple(feathered.shape[1:]), feather_px)
        for index, frame in enumerate(feathered):
            plate.put(index, frame)
        return plate

    def put(self, index: int, feathered: torch.Tensor) -> None:
        """Keep frame `index` of m: c = round(m·(2r + 1)²), exact (m is c / (2r + 1)²)."""
        self.counts[index] = torch.round(feathered * self.divisor)

    def __len__(self) -> int:
        return len(self.counts)

    def frame(self, index: int) -> torch.Tensor:
        """m[index], float32: c / (2r + 1)², as box_blur divides (the same bits)."""
        return (self.counts[index].to(torch.float32) / self.divisor).clamp_(0, 1)


@dataclass
class EditRegions:
    """An edit's regions, prepared once for the frames it edits (`prepare_regions`).

    plate:    m inside the framing's box at the source's resolution (a Plate, in host
              memory: only the composite reads it); None under camera motion (the whole
              frame is regenerated)
    latent:   m_lat, (F', h, w) at latent resolution; None under camera motion
    guidance: the masks whose motions guide the edit at latent resolution, (R', F', h, w)
    """

    count: int
    motion: str
    plate: Plate | None
    latent: torch.Tensor | None
    guidance: torch.Tensor

    def keeps_plate(self) -> bool:
        return self.plate is not None


def prepare_regions(frames: Iterable[np.ndarray | torch.Tensor], frame_count: int, count: int,
                    motion: str, grow_px: int, feather_px: int, box: tuple[int, int, int, int],
                    model_frames: int, latent_frames: int, latent_size: tuple[int, int],
                    device: torch.device | str = "cpu") -> EditRegions:
    """The regions of the frames an edit uses, framed as the frames are.

    frames: for each of the `frame_count` frames the edit uses, in order, its `count`
    regions' pixels (R, H, W) (bool, or 0/1) at the source's resolution. They are read
    one at a time, so only one frame's masks are ever held at the source's size (host
    memory), beside the plate; what the sampler needs, at latent resolution, goes to
    `device`. Camera motion without a region is the whole-frame SMM, the edit without
    regions (no call here).

    box: (left, top, right, bottom), the source pixels the model sees. model_frames:
    the frames the VAE gets (the chosen ones, the last repeated); latent_frames,
    latent_size = (w, h): the latent's. Grow is measured on the whole source frame,
    then the box is cut out and feathered (so m is 0 outside the box too), then
    resampled to the latent (the mask follows the crop box and the fit size). Every
    piece works frame by frame, so this equals the whole-clip composition

        plate    = feather(grow(U, g)[box], f)
        latent   = to_latent(pad_frames(plate, model_frames), latent_frames, latent_size)
        guidance = to_latent(pad_frames(guidance_masks(M[box]), model_frames), …)

    bit for bit (tests/test_regions.py).
    """
    left, top, right, bottom = box
    guidance_cells: list[torch.Tensor] = []
    plate_cells: list[torch.Tensor] = []
    plate = Plate.empty(frame_count if motion == "subject" else 0, (bottom - top, right - left),
                        feather_px)
    for index, pixels in enumerate(frames):
        regions = torch.as_tensor(pixels).to(torch.float32)[:, None]  # (R, 1, H, W): M_r
        boxed = regions[..., top:bottom, left:right]
        guidance_cells.append(to_latent(guidance_masks(boxed, motion, boxed.shape[1:]), 1,
                                        latent_size))
        if motion == "subject":
            grown = grow(regions.amax(dim=0), grow_px)[:, top:bottom, left:right]  # (1, h, w)
            plate.put(index, feather(grown, feather_px)[0])
            plate_cells.append(to_latent(plate.frame(index)[None], 1, latent_size))
        del regions, boxed  # one frame's masks at the source's size at a time

    def latent_of(cells: list[torch.Tensor], frame_dim: int) -> torch.Tensor:
        """The per-frame latent cells, padded to the VAE's frames and pooled per latent
        frame (to_latent's max over each latent frame's pixel frames), on `device`."""
        padded = pad_frames(torch.cat(cells, dim=frame_dim), model_frames)
        groups = latent_frame_groups(padded.shape[-3], latent_frames)
        if len(groups) != padded.shape[-3]:
            padded = torch.stack([padded[..., start:end, :, :].amax(dim=-3)
                                  for start, end in groups], dim=-3)
        return padded.to(device)

    guidance = latent_of(guidance_cells, 1)
    if motion == "camera":
        return EditRegions(count, motion, None, None, guidance)
    return EditRegions(count, motion, plate, latent_of(plate_cells, 0), guidance)


def generation_mask(plate: Plate, model_size: tuple[int, int], model_frames: int) -> torch.Tensor:
    """Where the model makes new pixels, at its size: (model_frames, H, W) bool, true
    wherever the plate m (at its box's size) is above 0 in the model pixel's area
    (the grown region, as the feather leaves it; outside it the composite keeps the
    source exactly), the last frame repeated up to the model's frames (as the clip is
    padded). model_size = (W, H). What Wan VACE's mask is (backend/backbones/wan_vace.py)."""
    width, height = model_size
    frames = [functional.interpolate(plate.frame(index)[None, None].float(), size=(height, width),
                                     mode="area")[0, 0] > 0
              for index in range(len(plate.counts))]
    return pad_frames(torch.stack(frames), model_frames)


def composite_into_frames(source: np.ndarray, result: np.ndarray, plate: Plate,
                          box: tuple[int, int, int, int], in_place: bool = False) -> np.ndarray:
    """The source frames (F, H, W, 3) with the result (F, h, w, 3, covering `box`) resized
    to the box and composited through m inside it: out = m·gen + (1 − m)·source. Outside
    the box, and wherever m = 0, every pixel is the source's. One frame at a time (the
    float work of a frame, never of the clip); `in_place`: written over `source` (whose
    frame is read before it is written), when the caller needs the source no more."""
    from backend.video import resize_frames

    left, top, right, bottom = box
    out = source if in_place else source.copy()
    for index in range(len(source)):
        inside = np.ascontiguousarray(source[index:index + 1, top:bottom, left:right])
        generated = resize_frames(result[index:index + 1], right - left, bottom - top)
        out[index:index + 1, top:bottom, left:right] = composite(generated, inside,
                                                                 plate.frame(index)[None])
    return out


def plate_alpha_frames(plate: Plate, box: tuple[int, int, int, int],
                       size: tuple[int, int]) -> np.ndarray:
    """backend/results.py plate_alpha of the whole plate, (F, H, W) uint8, one frame at a
    time (no float copy of the clip's plate)."""
    from backend.results import plate_alpha

    alpha = np.empty((len(plate), size[1], size[0]), np.uint8)
    for index in range(len(plate)):
        alpha[index] = plate_alpha(plate.frame(index).numpy()[None], box, size)[0]
    return alpha
