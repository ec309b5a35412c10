"""A small random CLIP model saved like a real one, for tests of edit fidelity.

Its scores are noise, never quality. The tokenizer is byte-level BPE with no merges
(every byte is a token), written offline: 2 × 256 byte tokens plus the two specials.
"""

from __future__ import annotations

from pathlib import Path


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """Write a tiny random CLIPModel + CLIPProcessor to `folder` with save_pretrained."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from backend.backbones.zeroscope import build_byte_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_byte_tokenizer()
    vocab = tokenizer.get_vocab()

    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32},
                                         crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
