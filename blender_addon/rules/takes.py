"""Takes: several results of one transfer (one per seed), kept as a stack of strips.

Which takes to fetch when the server says some are ready, which take shows after
Next or Previous, and the settings that render a preview take again at final quality.
Plain Python (no bpy): vse/stack.py holds the strips, job_flow/jobs.py the flow.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from .errors import UserError
from .states import PROTOCOL

JobState, EventType = PROTOCOL.JobState, PROTOCOL.EventType
FINAL, PREVIEW = "final", "preview"  # shared/settings.py QUALITIES


def _take_number(value: object, total: int) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= total:
        return value
    return None


def takes_to_fetch(event: dict, total: int, placed: Collection[int]) -> list[int]:
    """The takes of a job of `total` takes to fetch and place now, in order, from a
    server event or status reply: the take a `take_ready` names; the takes a job object
    lists as done (`takes_done`: a reopened file, missed events, a cancelled job's
    finished takes); every take once the job is done. Takes already placed, and numbers
    outside 1..total, are left out."""
    kind = event.get("type") if "type" in event else event.get("state")
    if kind == EventType.TAKE_READY:
        wanted: Sequence[object] = [event.get("take")]
    elif kind in (EventType.RESULT_READY, JobState.DONE):
        wanted = range(1, total + 1)
    else:
        done = event.get("takes_done")
        wanted = done if isinstance(done, list) else []
    numbers = {_take_number(value, total) for value in wanted}
    return sorted(number for number in numbers if number is not None and number not in placed)


def visible_take(stack: Sequence[tuple[int, int, bool]]) -> int | None:
    """The take a stack shows, from its strips' (take number, channel, muted): the
    unmuted one on the highest channel (it covers any below); None when all are muted."""
    shown = [(channel, number) for number, channel, muted in stack if not muted]
    return max(shown)[1] if shown else None


def step_take(numbers: Sequence[int], visible: int | None, step: int) -> int:
    """The take Next (step 1) or Previous (step -1) shows: the neighbour of the visible
    one in take order, round the end; the first take when none is visible."""
    order = sorted(numbers)
    if not order:
        raise UserError("The take stack holds no takes; make takes with Preview first.")
    if visible not in order:
        return order[0]
    return order[(order.index(visible) + step) % len(order)]


def final_values(take_sidecar: dict, take: int) -> dict:
    """The settings that render a take again at final quality: the take's own (its
    prompt and seed included) from its sidecar, with quality "final"."""
    settings = take_sidecar.get("settings") if isinstance(take_sidecar, dict) else None
    seed = take_sidecar.get("seed") if isinstance(take_sidecar, dict) else None
    if not isinstance(settings, dict) or not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"Take {take}'s record has no settings or seed to render it from; make "
                        f"the takes again with Preview.")
    values = {**settings, "seed": seed, "quality": FINAL}
    if isinstance(take_sidecar.get("prompt"), str):  # a take's own prompt (several prompts)
        values["prompt"] = take_sidecar["prompt"]
    return values


def sidecar_quality(take_sidecar: dict) -> str:
    """The quality a take was made at, as its sidecar records it (final when it does not)."""
    settings = take_sidecar.get("settings") if isinstance(take_sidecar, dict) else None
    quality = settings.get("quality") if isinstance(settings, dict) else None
    return PREVIEW if quality == PREVIEW else FINAL
