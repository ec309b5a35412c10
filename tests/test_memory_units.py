"""One unit for memory everywhere: every memory flag takes GiB (2^30 bytes), says so in
its help, and the plans print GiB."""

from __future__ import annotations

import json

from backend.cli import build_parser, main
from backend.memory.planner import gpu_description

TINY = ["memory", "--model", "tiny", "--frames", "2", "--size", "64x64", "--device", "cpu"]


def test_gpu_memory_gb_counts_gib(capsys) -> None:  # noqa: ANN001
    """A budget of exactly the plan's peak, given in GiB, fits with no saver; one byte
    less needs one (10^9-byte gigabytes would fall 7 % short and take savers)."""
    assert main([*TINY, "--json"]) == 0
    peak = json.loads(capsys.readouterr().out)["peak_bytes"]
    assert main([*TINY, "--gpu-memory-gb", repr(peak / 2**30)]) == 0
    printed = capsys.readouterr().out
    assert "(predicted, MiB)" in printed and f"fits {peak / 2**30:g} GiB with: no saver" in printed
    assert main([*TINY, "--gpu-memory-gb", repr((peak - 1) / 2**30), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["chosen"]["savers"] != []


def test_assumed_gpu_memory_counts_gib() -> None:
    gpu = gpu_description(None, 10)
    assert gpu == {"name": "assumed 10 GiB", "total_bytes": 10 * 2**30, "free_bytes": 10 * 2**30,
                   "budget_bytes": 10 * 2**30, "assumed": True}


def test_every_memory_flag_says_its_unit() -> None:
    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command").choices
    flags = {("memory", "--gpu-memory-gb"), ("transfer", "--assume-gpu-memory-gb"),
             ("serve", "--assume-gpu-memory-gb"), ("transfer", "--cache-max-gb")}
    for command, flag in flags:
        action = next(action for action in commands[command]._actions if flag in action.option_strings)
        assert "GiB (2^30 bytes)" in action.help, (command, flag)
    message = next(action for action in commands["serve"]._actions
                   if "--max-message-mb" in action.option_strings)
    assert "MiB (2^20 bytes)" in message.help
