"""The embed phase (backend/memory/text_encoder.py, Engine.embed_prompts): the text
encoder never shares the GPU with the denoiser, and the embedding cache
(backend/method/embeddings.py) spares it on a re-edit, a new take or a retry.

The GPU is acted out on the CPU with a recorder in place of module.to (nothing real
runs on the "device"): the recorder says where each network would be at every call."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.edit import load_engine
from backend.memory.savers import MemoryDecision
from backend.method.embeddings import embedding_key
from backend.results import Take
from shared.settings import TransferSettings
from tests.test_memory_savers import QUICK, Recorder, clip, placed_by


@pytest.fixture(scope="module")
def engine():
    return load_engine("tiny", device="cpu")


class Watch:
    """Where the other networks are at every denoiser and every text-encoder call."""

    def __init__(self, backbone, recorder: Recorder) -> None:  # noqa: ANN001
        self.by_denoiser: set[str] = set()  # the text encoder's place at each denoiser call
        self.by_encoder: set[tuple[str, str]] = set()
        self.encoder_calls = 0
        self.handles = [
            backbone.unet.register_forward_pre_hook(
                lambda *_: self.by_denoiser.add(recorder.where["text_encoder"])),
            backbone.text_encoder.register_forward_pre_hook(lambda *_: self.saw_encoder(recorder)),
        ]

    def saw_encoder(self, recorder: Recorder) -> None:
        self.encoder_calls += 1
        self.by_encoder.update((name, recorder.where[name]) for name in ("denoiser", "vae"))
        self.by_encoder.add(("text_encoder", recorder.where["text_encoder"]))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def test_the_text_encoder_never_shares_the_gpu_with_the_denoiser(engine, monkeypatch) -> None:  # noqa: ANN001
    """Loaded as on CUDA (the encoder in host memory), an edit embeds its three prompts
    with the encoder on the device alone (the denoiser and the VAE in host memory), and
    at every denoiser call the encoder is in host memory; everything ends at home. With
    text_encoder_offload the encoder embeds where it lives and nothing moves for it."""
    backbone = engine.backbone
    recorder = Recorder(backbone)
    recorder.where["text_encoder"] = "host"  # as load_zeroscope leaves it on CUDA
    placed_by(monkeypatch, recorder)
    watch = Watch(backbone, recorder)
    try:
        engine.transfer(clip(), TransferSettings(**QUICK))
        assert watch.encoder_calls == 3 and watch.by_denoiser == {"host"}
        assert watch.by_encoder == {("denoiser", "host"), ("vae", "host"), ("text_encoder", "device")}
        assert recorder.moves == [("denoiser", "host"), ("vae", "host"), ("text_encoder", "device"),
                                  ("text_encoder", "host"), ("denoiser", "device"), ("vae", "device")]
        recorder.moves.clear()
        watch.by_denoiser.clear()
        on_cpu = MemoryDecision(("text_encoder_offload",), 1, 1)
        engine.transfer(clip(), TransferSettings(**{**QUICK, "prompt": "a cow"}), savers=on_cpu)
        assert watch.encoder_calls == 6 and recorder.moves == [] and watch.by_denoiser == {"host"}
    finally:
        watch.close()


def test_known_prompts_never_load_the_text_encoder(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The embedding cache: a new take (another seed) and a re-edit with the same prompts
    neither run nor move the encoder, and give the frames the first embedding gave;
    a changed target, source or negative prompt misses."""
    engine = load_engine("tiny", device="cpu", cache_dir=tmp_path)
    recorder = Recorder(engine.backbone)
    recorder.where["text_encoder"] = "host"
    placed_by(monkeypatch, recorder)
    watch = Watch(engine.backbone, recorder)
    settings = TransferSettings(**QUICK)
    try:
        first = engine.transfer(clip(), settings).frames
        assert watch.encoder_calls == 3 and len(list(tmp_path.glob("embedding-*.safetensors"))) == 1
        recorder.moves.clear()
        engine.transfer(clip(), TransferSettings(**{**QUICK, "seed": 4}))  # a new take
        again = engine.transfer(clip(), settings).frames  # a retry
        assert watch.encoder_calls == 3 and recorder.moves == []
        np.testing.assert_array_equal(first, again)
        for change in ({"prompt": "a cow"}, {"source_prompt": "a cat"},
                       {"negative_prompt": "blurry"}, {"prompt_prefix": "film, "}):
            calls = watch.encoder_calls
            engine.transfer(clip(), TransferSettings(**{**QUICK, **change}))
            assert watch.encoder_calls == calls + 3, change
    finally:
        watch.close()


def test_takes_embed_each_prompt_once_and_known_ones_never(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Two prompts × two seeds: the encoder runs once for the source and the negative and
    once per distinct prompt (4 calls, 2 cache files); the same takes again run it never."""
    engine = load_engine("tiny", device="cpu", cache_dir=tmp_path)
    recorder = Recorder(engine.backbone)
    recorder.where["text_encoder"] = "host"
    placed_by(monkeypatch, recorder)
    watch = Watch(engine.backbone, recorder)
    takes = [Take("a cat", 1), Take("a cat", 2), Take("a cow", 1), Take("a cow", 2)]
    try:
        embeddings = engine.embed_prompts(TransferSettings(**QUICK), takes)
        assert watch.encoder_calls == 4 and len(list(tmp_path.glob("embedding-*.safetensors"))) == 2
        assert embeddings.target.shape[0] == 4
        torch.testing.assert_close(embeddings.target[0], embeddings.target[1], rtol=0, atol=0)
        assert not torch.equal(embeddings.target[1], embeddings.target[2])
        again = engine.embed_prompts(TransferSettings(**QUICK), takes)
        assert watch.encoder_calls == 4
        torch.testing.assert_close(again.target, embeddings.target, rtol=0, atol=0)
    finally:
        watch.close()


def test_the_embedding_key_names_everything_the_embeddings_depend_on() -> None:
    key = embedding_key("tiny", torch.float32, "a dog", "a cat", "blurry")
    assert key == embedding_key("tiny", torch.float32, "a dog", "a cat", "blurry")
    assert len({key, embedding_key("wan-tiny", torch.float32, "a dog", "a cat", "blurry"),
                embedding_key("tiny", torch.float16, "a dog", "a cat", "blurry"),
                embedding_key("tiny", torch.float32, "a cat", "a cat", "blurry"),
                embedding_key("tiny", torch.float32, "a dog", "a dog", "blurry"),
                embedding_key("tiny", torch.float32, "a dog", "a cat", ""),
                embedding_key("tiny", torch.float32, "a dog", "a cat", "blurry", fp8=True)}) == 7


def test_text_encoder_fp8_embeds_in_float8_and_keeps_its_own_cache_entries(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """text_encoder_fp8 (acted out as on a GPU): the encoder runs with float8 layers, the
    embeddings move by float8's rounding only, the encoder has its own weights after, a
    float8 embedding is cached under its own key (a plain edit never reads it, nor it a
    plain one), and a known prompt then runs no encoder at all."""
    engine = load_engine("tiny", device="cpu", cache_dir=tmp_path)
    placed_by(monkeypatch, Recorder(engine.backbone))
    encoder = engine.backbone.text_encoder
    before = {name: tensor.clone() for name, tensor in encoder.state_dict().items()}
    stored: list[set[torch.dtype]] = []  # per encoder call: its parameters' dtypes
    hook = encoder.register_forward_pre_hook(
        lambda module, _args: stored.append({p.dtype for p in module.parameters()}))
    try:
        plain = engine.embed_prompts(TransferSettings(**QUICK))
        cast = engine.embed_prompts(TransferSettings(**QUICK), fp8=True)
        calls = len(stored)
        again = engine.embed_prompts(TransferSettings(**QUICK), fp8=True)
    finally:
        hook.remove()
    assert torch.float8_e4m3fn not in stored[0] and torch.float8_e4m3fn in stored[-1]
    assert len(stored) == calls  # the float8 embedding came from the cache
    assert torch.equal(again.target, cast.target)
    change = (cast.target - plain.target).abs().max() / plain.target.abs().max()
    assert 0 < change < FP8_EMBEDDING_CHANGE, change
    assert all(torch.equal(before[name], tensor) for name, tensor in encoder.state_dict().items())


FP8_EMBEDDING_CHANGE = 0.25  # of the largest embedding value (measured 0.11 on the tiny CLIP; docs/memory.md)
