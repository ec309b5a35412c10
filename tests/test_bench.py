"""The benchmark's accounting, and one small run of the whole command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from backend.bench import forward_equivalents
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
