"""The on-disk cache of what inverting a clip yields (the inversion itself is the
backbone schedule's: DDIM in backend/backbones/ddim.py, flow matching for Wan).

What a re-edit of the same clip needs is kept together as a `SourceState`: the
source latent z₀ of the whole clip, the inverted latents at the sampling timesteps,
the noisiest inverted latent, and the source SMM features of each window at the
guided timesteps. It is cached as one safetensors file per key (no pickle), written
atomically; when the cache folder grows past its size cap, the least recently used
files go first.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CACHE_FORMAT = 2  # 2: source features per window
DEFAULT_CACHE_MAX_BYTES = 20 * 2**30  # --cache-max-gb
CACHE_GLOB = "inversion-*.safetensors"


@dataclass
class SourceState:
    source_latent: torch.Tensor  # z₀, (1, C, F, h, w)
    # sampling timestep → inverted x_t, (1, C, F, h, w); these and the noisiest in host
    # memory when the model runs on a GPU (Backbone.to_host), read a window at a time
    inverted: dict[float, torch.Tensor]
    noisiest_timestep: float
    noisiest: torch.Tensor  # x_T at the last inversion timestep
    # guided timestep → per window → per tap: the source SMM, (window frames, D)
    features: dict[float, list[list[torch.Tensor]]]


def _timestep_name(timestep: float) -> str:
    """A timestep as part of a tensor name: 981 → "981", 937.5 → "937p5" (names split on ".")."""
    return str(timestep).replace(".", "p")


def _timestep_of(name: str) -> float:
    """The inverse of _timestep_name: an int DDIM timestep or a float flow-matching one."""
    return float(name.replace("p", ".")) if "p" in name else int(name)


def cache_key(frames: np.ndarray, parts: dict) -> str:
    """Hash of the model-input frames and every setting the cached state depends on."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True).encode())
    digest.update(str(frames.shape).encode())
    digest.update(np.ascontiguousarray(frames).tobytes())
    return digest.hexdigest()[:32]


class InversionCache:
    """One safetensors file per key under `folder`; `folder=None` disables caching.

    At most `max_bytes` of files are kept: after each save the least recently used
    ones (oldest modification time; a hit touches its file) are deleted until the
    rest fit. The file just written is always kept, even alone over the cap.
    """

    def __init__(self, folder: Path | None, max_bytes: int = DEFAULT_CACHE_MAX_BYTES) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.max_bytes = max_bytes

    def path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"inversion-{key}.safetensors"

    def load(self, key: str, device: torch.device) -> SourceState | None:
        path = self.path(key)
        if path is None or not path.exists():
            return None
        try:
            # The inverted latents (and the noisiest) stay in host memory, where the
            # engine keeps them on a GPU (Backbone.to_host); the rest goes to `device`.
            tensors = load_file(str(path), device="cpu")
            noisiest_timestep = tensors.pop("noisiest_timestep").item()
            state = SourceState(tensors.pop("source_latent").to(device), {}, noisiest_timestep,
                                tensors.pop("noisiest"), {})
            features: dict[float, dict[int, dict[int, torch.Tensor]]] = {}
            for name, tensor in tensors.items():
                kind, timestep, *rest = name.split(".")
                if kind == "inverted":
                    state.inverted[_timestep_of(timestep)] = tensor
                else:
                    window, tap = (int(part) for part in rest)
                    features.setdefault(_timestep_of(timestep), {}).setdefault(window, {})[tap] = (
                        tensor.to(device))
            state.features = {t: [[taps[i] for i in sorted(taps)] for _, taps in sorted(windows.items())]
                              for t, windows in features.items()}
            os.utime(path)  # most recently used
            return state
        except Exception:  # a damaged cache file is a miss, never an error
            path.unlink(missing_ok=True)
            return None

    def save(self, key: str, state: SourceState) -> None:
        path = self.path(key)
        if path is None:
            return
        tensors = {
            "source_latent": state.source_latent,
            "noisiest": state.noisiest,
            "noisiest_timestep": torch.tensor(state.noisiest_timestep),
        }
        for timestep, latent in state.inverted.items():
            tensors[f"inverted.{_timestep_name(timestep)}"] = latent
        for timestep, windows in state.features.items():
            for window, taps in enumerate(windows):
                for tap, feature in enumerate(taps):
                    tensors[f"features.{_timestep_name(timestep)}.{window}.{tap}"] = feature
        stored: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, tensor in tensors.items():
            tensor = tensor.detach().contiguous().cpu()
            if tensor.untyped_storage().data_ptr() in seen:  # safetensors refuses shared memory
                tensor = tensor.clone()
            seen.add(tensor.untyped_storage().data_ptr())
            stored[name] = tensor
        tensors = stored
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        save_file(tensors, str(partial))
        os.replace(partial, path)
        self.prune(keep=path)

    def prune(self, keep: Path | None = None) -> list[Path]:
        """Delete least recently used inversion files until they fit `max_bytes`."""
        return prune_folder(self.folder, CACHE_GLOB, self.max_bytes, keep)


def prune_folder(folder: Path | None, glob: str, max_bytes: int, keep: Path | None = None,
                 ) -> list[Path]:
    """Delete the least recently used of `folder`'s files matching `glob` (oldest
    modification time first) until they fit `max_bytes`; never `keep`. Returns those deleted."""
    if folder is None:
        return []
    entries = []
    for file in folder.glob(glob):
        try:
            info = file.stat()
        except FileNotFoundError:  # another process pruned it first
            continue
        entries.append((info.st_mtime, info.st_size, file))
    entries.sort(key=lambda entry: entry[0])  # oldest first
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, file in entries:
        if total <= max_bytes:
            break
        if file == keep:
            continue
        file.unlink(missing_ok=True)
        total -= size
        removed.append(file)
    return removed
