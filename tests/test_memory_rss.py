"""The CPU plan against the resident memory of real edits, each in a fresh process.

The protocol is backend/tools/rss_probe.py's (glibc's thresholds fixed, one thread, a
warm-up of the same shapes, VmHWM over the edit less the VmRSS before it); the CPU
plan's own terms (convolution column buffers, the clip's frames) are backend/memory/cpu_terms.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backend.memory.counter import fake_world
from backend.memory.cpu_terms import CpuConvolutionScratch, columns_bytes
from backend.tools.rss_probe import Edit, measurements, planned_growth, start_measuring

# Each model at two frame counts (the second over one window: ZeroScope's window is 24
# frames, Wan's set to 17 here), two sizes, with and without checkpointing.
EDITS = [
    Edit("tiny", 16, (192, 128)),
    Edit("tiny", 40, (128, 96), gradient_checkpointing=True),
    Edit("wan-tiny", 9, (128, 96), gradient_checkpointing=True, window_frames=17),
    Edit("wan-tiny", 33, (96, 64), window_frames=17),
]


def test_plan_predicts_the_resident_memory_of_real_edits() -> None:
    """Every edit measured in its own forked process while this one plans them; each
    within 15 % of its measured growth. One test, not one per edit: the measuring
    process and the plans are made once (a module fixture is remade whenever xdist runs
    another module's test in between)."""
    process = start_measuring(EDITS)
    try:
        planned = [planned_growth(edit) for edit in EDITS]
    finally:
        measured = measurements(process)
    misses = []
    for edit, bytes_measured, bytes_planned in zip(EDITS, measured, planned, strict=True):
        print(f"{edit.label():<44} planned {bytes_planned / 2**20:7.2f} MiB  measured "
              f"{bytes_measured / 2**20:7.2f} MiB  measured/planned {bytes_measured / bytes_planned:.3f}")
        if abs(bytes_measured - bytes_planned) > 0.15 * bytes_measured:
            misses.append((edit.label(), bytes_measured, bytes_planned))
    assert not misses, misses


def test_columns_of_a_slow_convolution_by_hand() -> None:
    """Wan's tiny VAE: 8 channels, 3×3×3, 6 padded frames of 98×130 → 4×96×128 out:
    1 · 8 · 27 · (4·96·128) · 4 bytes = 42 467 328; a 1×1×1 kernel unfolds nothing;
    oneDNN's kernels unfold nothing the plan counts."""
    slow3d = torch._C._ConvBackend.Slow3d
    assert columns_bytes(slow3d, (1, 8, 6, 98, 130), (8, 8, 3, 3, 3), (1, 8, 4, 96, 128),
                         (1, 1, 1), (0, 0, 0), False, 4) == 42_467_328
    assert columns_bytes(slow3d, (1, 8, 6, 98, 130), (8, 8, 1, 1, 1), (1, 8, 6, 98, 130),
                         (1, 1, 1), (0, 0, 0), False, 4) == 0
    # A batch unfolds whole: 2 · 3 · 9 · (64·64) · 4 bytes.
    assert columns_bytes(torch._C._ConvBackend.Slow2d, (2, 3, 64, 64), (8, 3, 3, 3), (2, 8, 64, 64),
                         (1, 1), (1, 1), False, 4) == 884_736
    assert columns_bytes(torch._C._ConvBackend.Mkldnn, (4, 8, 96, 128), (8, 8, 3, 3), (4, 8, 96, 128),
                         (1, 1), (1, 1), False, 4) == 0


def test_scratch_raises_the_peak_by_the_columns_of_the_kernel_pytorch_picks() -> None:
    """On fake tensors: PyTorch runs Wan's small 3-D convolution on its slow kernel, so
    the peak is input + weight + output + columns; a wide 2-D one goes to oneDNN, which
    unfolds nothing but copies the weight into its own layout."""
    with fake_world() as (_fake, tracker):
        scratch = CpuConvolutionScratch(tracker)
        with scratch:
            volume, kernel = torch.empty(1, 8, 6, 98, 130), torch.empty(8, 8, 3, 3, 3)
            before = tracker.current
            tracker.reset_peak()
            out = F.conv3d(volume, kernel)
            assert tracker.peak == before + out.numel() * 4 + 42_467_328
            images, kernel2d = torch.empty(4, 64, 96, 128), torch.empty(64, 64, 3, 3)
            tracker.reset_peak()
            convolved = F.conv2d(images, kernel2d, padding=1)
            assert tracker.peak == tracker.current + 64 * 64 * 3 * 3 * 4  # oneDNN: the weight reordered
            assert convolved.shape == (4, 64, 96, 128)

