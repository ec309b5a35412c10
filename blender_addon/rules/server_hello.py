"""What a server's hello says (its model, its GPU, its limits), and refusing, before
anything is rendered, a job it would refuse.

Plain Python (no bpy). The hello's fields are docs/protocol.md §4's; a field an older
server does not send changes nothing.
"""

from __future__ import annotations

from .channels import Span
from .errors import UserError
from .memory_plan import gigabytes
from .panel_settings import SETTINGS
from .regions import Region


def frames_to_render(span: Span, max_frames: int, name: str = "The strip") -> list[int]:
    """Timeline frames to render: every visible frame of the strip, each one sent.

    The result has one generated frame per source frame, so nothing is sampled; a strip
    longer than the server's frame limit is refused before anything is rendered.
    """
    if span.length > max_frames:
        raise UserError(f"{name} shows {span.length} frames and the server edits at most "
                        f"{max_frames} frames per job; trim the strip or cut it into parts of "
                        f"{max_frames} frames or fewer.")
    return list(range(span.start, span.end))


def _limits(hello: dict) -> dict:
    return hello.get("limits") if isinstance(hello.get("limits"), dict) else {}


def server_backbone(hello: dict) -> dict:
    """The server's model as its hello describes it (engine.backbone: name, native_size,
    window_frames, frame_rate, side_multiple, defaults); {} from a server that does not say."""
    engine = hello.get("engine") if isinstance(hello.get("engine"), dict) else {}
    backbone = engine.get("backbone")
    if not isinstance(backbone, dict) or not isinstance(backbone.get("native_size"), list):
        return {}
    return backbone


def gpu_text(hello: dict) -> str:
    """The server's GPU as its hello describes it (`gpu`: name, total_bytes, free_bytes,
    assumed), e.g. "GPU NVIDIA H200, 139.8 GiB (120.3 GiB free)"; "" without one."""
    gpu = hello.get("gpu")
    if not isinstance(gpu, dict) or not isinstance(gpu.get("total_bytes"), int | float):
        return ""
    text = f"GPU {gpu.get('name') or '?'}, {gigabytes(gpu['total_bytes'])}"
    free = gpu.get("free_bytes")
    if isinstance(free, int | float) and not gpu.get("assumed"):
        text += f" ({gigabytes(free)} free)"
    return text


def server_frame_limit(hello: dict) -> int:
    """The most frames one job may have, as the server announces it in `hello`."""
    value = _limits(hello).get("max_frames")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
        return value
    return int(SETTINGS.MAX_FRAMES_CEILING)


def check_server_limits(hello: dict, settings: dict, render_size: tuple[int, int],
                        region: Region | None = None) -> None:
    """Refuse, before rendering, a job the server announced it would not take (a region
    goes only to a server whose limits name max_regions: an older one would take its
    masks for more frames of the strip).

    The frame count is checked by frames_to_render; the message size is known only
    once the frames are rendered (PNG sizes vary), so the client checks it before sending.
    """
    limits = _limits(hello)
    if region is not None and "max_regions" not in limits:
        raise UserError(f"The server does not take regions (it is older than this extension), "
                        f"so it cannot keep the plate outside {region.label}; update the "
                        f"server, or set the region to None.")
    max_side = limits.get("max_side")
    if isinstance(max_side, int) and max(render_size) > max_side:
        raise UserError(f"The frames would be {render_size[0]}x{render_size[1]} pixels and the "
                        f"server takes at most {max_side} on a side; set the render size limit "
                        f"in the Understudy preferences to {max_side} or less.")
    max_chars = limits.get("max_prompt_chars")
    for name in SETTINGS.TEXT_SETTINGS:
        text = settings.get(name)
        if isinstance(max_chars, int) and isinstance(text, str) and (
                problem := SETTINGS.text_length_problem(name, text, max_chars)):
            raise UserError(problem)
    side = server_backbone(hello).get("side_multiple")
    for name in ("width", "height"):
        value = settings.get(name)
        if isinstance(side, int) and side > 0 and isinstance(value, int) and value % side:
            raise UserError(f"The model {name} is {value} and the server's model takes multiples "
                            f"of {side}; set it to a multiple of {side}, or 0 for the model's own.")
    max_queue, queued = limits.get("max_queue"), hello.get("queue_length")
    if isinstance(max_queue, int) and isinstance(queued, int) and queued >= max_queue:
        raise UserError(f"The server already has {queued} jobs queued or running, its limit; "
                        f"transfer again when one has finished.")


def server_max_takes(hello: dict) -> int | None:
    """The most takes one job may have, as the server announces it (`max_takes`); None
    from a server that makes one take per job."""
    value = _limits(hello).get("max_takes")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return None


def check_takes(hello: dict, takes: int) -> None:
    """Refuse, before rendering, more takes than the server makes per job."""
    if takes <= 1:
        return
    most = server_max_takes(hello)
    if most is None:
        raise UserError("The server makes one take per job (it is older than this extension); "
                        "set Takes to 1, or update the server.")
    if takes > most:
        raise UserError(f"Takes is {takes} and the server makes at most {most} takes per job; "
                        f"set Takes to {most} or fewer.")
