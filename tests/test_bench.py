"""The benchmark's accounting, and one small run of the whole command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from backend.method.cost import forward_equivalents
from tests.conftest import REPO_ROOT


def test_forward_equivalents_weights_each_kind_of_pass():
    passes = {
        ("invert", "full"): 50,
        ("features", "truncated"): 20,
        ("guide", "truncated"): 200,
        ("guide", "truncated_backward"): 200,
        ("sample", "full"): 198,
    }
    fe = forward_equivalents(passes, truncated_share=0.6)
    assert fe["invert"] == pytest.approx(50 + 20 * 0.6)
    assert fe["sample"] == pytest.approx(200 * 0.6 + 200 * 1.2 + 198)
    assert fe["decode"] == 0
    reference = forward_equivalents({("guide", "full"): 200, ("guide", "full_backward"): 200}, 0.6)
    assert reference["sample"] == pytest.approx(600)


def test_bench_command_reports_three_runs(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "backend", "bench", "--arch", "tiny", "--frames", "2",
         "--width", "64", "--height", "64", "-o", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "forward-equivalents vs reference" in result.stdout
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert set(runs) == {"first edit", "re-edit", "reference"}
    # The re-edit reads the cache: no inversion work at all.
    assert runs["re-edit"]["forward_equivalents"]["invert"] == 0
    # The reference inverts with 999 steps; Understudy with the 50-step grid.
    assert runs["reference"]["forward_equivalents"]["invert"] > 999
    assert runs["first edit"]["forward_equivalents"]["invert"] < 100
    assert 0 < report["ratios_to_reference"]["re_edit_forward_equivalents"] < \
        report["ratios_to_reference"]["first_edit_forward_equivalents"] < 1


def test_bench_scaling_sets_each_length_against_windows_times_one_window(tmp_path):
    out = tmp_path / "scaling.json"
    result = subprocess.run(
        [sys.executable, "-m", "backend", "bench", "--scaling", "--lengths", "24,30",
         "--width", "64", "--height", "64", "-o", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "targets: cost ≤ 1.1× windows × one-window cost" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(row["frames"], row["windows"]) for row in rows] == [(24, 1), (30, 2)]
    # Every UNet use runs per window: two windows cost twice one window's passes.
    assert rows[1]["forward_equivalents"] == pytest.approx(2 * rows[0]["forward_equivalents"])
    assert rows[0]["seconds_ratio"] == rows[0]["memory_ratio"] == 1



def test_bench_upscale_counts_the_stage_in_first_stage_passes():
    from backend.tools.bench import TINY_SCALING_STEPS, format_upscale, run_upscale

    report = run_upscale("tiny", frames=2, steps=TINY_SCALING_STEPS)  # 10 steps: 7 upscaled
    assert (report["first_stage_size"], report["upscale_size"]) == ([128, 64], [256, 128])
    assert report["upscale_steps"] == 7 and report["upscale_unet_passes"] == 14  # CFG pairs
    assert report["upscale_forward_equivalents"] == pytest.approx(
        14 * report["upscale_pass_to_first_stage_pass"])
    assert set(report["seconds"]) == {"invert", "sample", "decode", "upscale"}
    assert "7 steps = 14 full passes at 256×128" in format_upscale(report)


def test_bench_runs_wans_architecture_and_its_reference_inverts_on_a_multiple_of_the_steps():
    from backend.tools.bench import run_bench

    report = run_bench("wan-tiny", frames=5, width=64, height=64)
    assert report["backbone"] == "wan"
    runs = report["runs"]
    # 50 steps: the reference's 999 inversion steps become 1000, Understudy's stay 50.
    assert runs["reference"]["forward_equivalents"]["invert"] >= 1000
    assert 50 <= runs["first edit"]["forward_equivalents"]["invert"] < 100
    assert runs["re-edit"]["forward_equivalents"]["invert"] == 0
    assert report["settings"]["guidance_block"] == 1 and report["settings"]["cfg_scale"] == 5.0
    assert 0 < report["ratios_to_reference"]["first_edit_forward_equivalents"] < 1


def test_bench_takes_sets_k_batched_takes_against_k_single_edits(tmp_path, capsys):
    from backend.cli import main

    out = tmp_path / "takes.json"
    # In this process (torch is loaded already) and at three steps: the counts compared
    # are per step, so a few steps assert what fifty would.
    assert main(["bench", "--arch", "tiny", "--takes", "2", "--frames", "2", "--width", "64",
                 "--height", "64", "--steps", "3", "-o", str(out)]) == 0
    assert "2 takes batched" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["takes"] == 2 and report["settings"]["steps"] == 3
    # The same work, counted per batch element: one inversion either way (cached after).
    assert report["batched"]["forward_equivalents"]["invert"] == \
        report["single"]["forward_equivalents"]["invert"]
    assert report["batched_to_single"]["forward_equivalents"] == pytest.approx(1.0)
    assert report["batched_to_single"]["seconds"] > 0
