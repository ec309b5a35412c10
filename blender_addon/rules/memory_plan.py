"""The memory plan as the panel shows it: a server's `plan` reply in one line.

Plain Python (no bpy). Check GPU Memory asks the server for the plan of the active
strip's transfer (docs/protocol.md §4, `plan`); this is the line the panel shows.
"""

from __future__ import annotations


def gigabytes(nbytes: float) -> str:
    """17179869184 → "16.0 GiB"; under a GiB in MiB (as the backend's plan prints them)."""
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def memory_line(reply: dict) -> str:
    """The panel's line for a server's `plan` reply (docs/protocol.md §4): the predicted
    peak against the server's GPU, the savers it needs, or why it cannot fit."""
    gpu = reply.get("gpu")
    if not isinstance(gpu, dict):
        return "The server has no GPU to plan for (it runs on a CPU)."
    budget = gigabytes(gpu.get("budget_bytes") or gpu.get("total_bytes") or 0)
    if reply.get("fits") is False:
        return str(reply.get("message") or f"Too big for the server's GPU ({budget}).")
    peak = reply.get("predicted_peak_bytes")
    if not isinstance(peak, int | float):
        return f"Not planned (memory 'off'); the server's GPU has {budget}."
    savers = reply.get("savers") or []
    saving = f", with {', '.join(str(s).replace('_', ' ') for s in savers)}" if savers else ""
    return f"Predicted peak {gigabytes(peak)} of {budget} GPU memory{saving}."
