"""The on-disk cache of an edit's prompt embeddings, beside the inversion cache.

An edit embeds three prompts, in one phase before the denoiser is used
(backend/method/engine.py Engine.embed_prompts): the source prompt and the target
prompt as applied (with the model's prompt prefix, TransferSettings.full_prompt) and
the negative prompt. The three embeddings are kept together, one safetensors file per
key, in the inversion cache's folder (`embedding-<key>.safetensors`), so a re-edit, a
new take or a retry with known prompts never loads or moves the text encoder (for Wan
that is 10.6 GiB of UMT5 weights and its trip to the GPU).

The key is a hash of the model id (which names the tokenizer and the text encoder),
the model's dtype, whether the encoder's weights were stored in float8 (the
text_encoder_fp8 saver moves the embeddings by its rounding) and the three prompts as
applied: a different negative prompt is a different key. The folder's embedding files have their own size cap
(DEFAULT_EMBEDDING_CACHE_MAX_BYTES, 1 GiB: about 80 Wan edits' prompts at 12 MiB, or
2,000 ZeroScope ones), pruned least recently used first as the inversions are.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from backend.method.inversion import prune_folder

EMBEDDING_FORMAT = 1
DEFAULT_EMBEDDING_CACHE_MAX_BYTES = 2**30
EMBEDDING_GLOB = "embedding-*.safetensors"
ROLES = ("source", "target", "negative")


@dataclass(frozen=True)
class PromptEmbeddings:
    """An edit's prompt embeddings on the model's device: the source's and the negative's
    (1, L, E); the target's (1, L, E), or (K, L, E) for K takes, row k take k's."""

    source: torch.Tensor
    target: torch.Tensor
    negative: torch.Tensor

    def of_takes(self, rows: list[int]) -> PromptEmbeddings:
        """The embeddings of the takes at `rows` (their target rows, in that order)."""
        return PromptEmbeddings(self.source, self.target[rows], self.negative)


def embedding_key(model_id: str, dtype: torch.dtype, source: str, target: str, negative: str,
                  fp8: bool = False) -> str:
    """Hash of the model (tokenizer and encoder), its dtype, the encoder's float8 storage
    (text_encoder_fp8) and the three prompts as applied."""
    parts = {"format": EMBEDDING_FORMAT, "model": model_id, "dtype": str(dtype), "fp8": fp8,
             "source": source, "target": target, "negative": negative}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


class EmbeddingCache:
    """One safetensors file per key under `folder`; `folder=None` disables caching.
    At most `max_bytes` of embedding files are kept (least recently used go first; a
    hit touches its file; the file just written is always kept)."""

    def __init__(self, folder: Path | None,
                 max_bytes: int = DEFAULT_EMBEDDING_CACHE_MAX_BYTES) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.max_bytes = max_bytes

    def path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"embedding-{key}.safetensors"

    def load(self, key: str, device: torch.device) -> PromptEmbeddings | None:
        path = self.path(key)
        if path is None or not path.exists():
            return None
        try:
            tensors = load_file(str(path), device=str(device))
            embeddings = PromptEmbeddings(*(tensors[role] for role in ROLES))
            os.utime(path)  # most recently used
            return embeddings
        except Exception:  # a damaged cache file is a miss, never an error
            path.unlink(missing_ok=True)
            return None

    def save(self, key: str, embeddings: PromptEmbeddings) -> None:
        path = self.path(key)
        if path is None:
            return
        tensors = {role: getattr(embeddings, role).detach().cpu().contiguous().clone()
                   for role in ROLES}  # clones: safetensors refuses shared memory
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        save_file(tensors, str(partial))
        os.replace(partial, path)
        prune_folder(self.folder, EMBEDDING_GLOB, self.max_bytes, keep=path)
