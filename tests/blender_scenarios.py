"""Scenarios that run inside a fresh headless Blender (the bpy module), one per process.

    python tests/blender_scenarios.py '{"scenario": "transfer", "zip": ..., ...}'

bpy state is global, so every scenario gets its own interpreter. Each one installs
the built extension zip into a throw-away user folder (BLENDER_USER_RESOURCES, set by
the caller), does its work, and prints one line `RESULT_JSON {...}` for the test.
"""

from __future__ import annotations

import importlib
import json
import sys
import threading
import time
from pathlib import Path

import bpy

ADDON = "bl_ext.user_default.understudy"
# Settings that make the tiny model finish a job in seconds on a CPU.
# (Every visible frame of the strip is sent; the panel has no frame count.)
SMALL_SETTINGS = {"width": 64, "height": 64, "steps": 3, "guided_steps": 1,
                  "guidance_iterations": 1, "inversion_steps": 3}


def install(zip_path: str) -> None:
    result = bpy.ops.extensions.package_install_files(
        filepath=zip_path, repo="user_default", enable_on_install=True)
    assert result == {"FINISHED"}, result
    assert ADDON in bpy.context.preferences.addons, list(bpy.context.preferences.addons.keys())


def configure(args: dict) -> None:
    prefs = bpy.context.preferences.addons[ADDON].preferences
    prefs.backend_kind = "LOCAL" if args.get("project") is not None else "SERVER"
    prefs.server_address = args.get("address", prefs.server_address)
    prefs.timeout_s = args.get("timeout_s", 10.0)
    prefs.max_render_size = 96
    for key in ("server_key_file", "client_key_file"):
        if key in args:
            setattr(prefs, key, args[key])


def small_settings(scene, overrides: dict | None = None) -> None:
    for name, value in {**SMALL_SETTINGS, **(overrides or {})}.items():
        setattr(scene.understudy, name, value)


def strips(scene):
    editor = scene.sequence_editor
    return editor.strips if hasattr(editor, "strips") else editor.sequences


def movie_strip(scene, clip: str, channel: int = 2, start: int = 1, trim: tuple = (3, 4)):
    """A movie strip trimmed at both ends, made active."""
    editor = scene.sequence_editor_create()
    strip = strips(scene).new_movie("source", clip, channel, start, fit_method="FIT")
    strip.frame_offset_start, strip.frame_offset_end = trim
    editor.active_strip = strip
    return strip


def strip_state(strip) -> dict:
    state = {name: getattr(strip, name) for name in (
        "name", "type", "channel", "frame_start", "frame_final_start", "frame_final_end",
        "frame_final_duration", "frame_offset_start", "frame_offset_end", "mute", "select",
        "blend_type", "blend_alpha")}
    if hasattr(strip, "transform"):  # how it sits on the canvas (the render changes it for a while)
        transform, crop = strip.transform, strip.crop
        state["transform"] = [round(value, 4) for value in (
            transform.scale_x, transform.scale_y, transform.offset_x, transform.offset_y,
            transform.rotation)]
        state["crop"] = [crop.min_x, crop.max_x, crop.min_y, crop.max_y]
        state["flip"] = [strip.use_flip_x, strip.use_flip_y]
    for name in ("filepath", "directory"):
        if hasattr(strip, name):
            state[name] = getattr(strip, name)
    if hasattr(strip, "elements"):
        state["elements"] = [element.filename for element in strip.elements]
    return state


def scene_state(scene) -> dict:
    """Everything a transfer must leave as it was (strips, render and view settings)."""
    render, image = scene.render, scene.render.image_settings
    view = scene.view_settings
    return {
        "strips": sorted((strip_state(s) for s in strips(scene)), key=lambda s: s["name"]),
        "frames": [scene.frame_start, scene.frame_end, scene.frame_current, scene.frame_step],
        "render": [render.resolution_x, render.resolution_y, render.resolution_percentage,
                   render.filepath, render.use_sequencer, render.use_compositing,
                   render.use_stamp, image.file_format, image.color_mode,
                   getattr(image, "media_type", None)],
        "view": [view.view_transform, view.look, view.exposure, view.gamma],
        "jobs": len(scene.understudy_jobs),
    }


def job_state(job) -> dict:
    state = {name: getattr(job, name) for name in (
        "job_id", "prompt", "status", "phase", "message", "seed", "result_strip", "frames_dir",
        "channel", "frame_start", "length", "sidecar")}
    state["frames_path"] = bpy.path.abspath(job.frames_dir)
    state["summary"] = job.sidecar_summary()
    return state


def new_effect(scene, name: str, kind: str, channel: int, start: int, length: int, **inputs):
    """An effect strip in either Blender (5.0 renamed frame_end to length and seq1 to input1)."""
    collection = strips(scene)
    names = [p.identifier for p in collection.bl_rna.functions["new_effect"].parameters]
    if "length" in names:
        return collection.new_effect(name, kind, channel, start, length=length, **inputs)
    return collection.new_effect(name, kind, channel, start, frame_end=start + length,
                                 **{key.replace("input", "seq"): value
                                    for key, value in inputs.items()})


def run_operator(operator, **kwargs) -> dict:
    try:
        return {"ok": True, "returned": sorted(operator(**kwargs))}
    except RuntimeError as error:  # operator reports of type ERROR arrive here
        return {"ok": False, "error": str(error)}


def new_strips(scene, before: dict) -> list[dict]:
    names = {s["name"] for s in before["strips"]}
    return [strip_state(s) for s in strips(scene) if s.name not in names]


def finish(scene, before: dict, outcome: dict, **extra) -> dict:
    after = scene_state(scene)
    return {"outcome": outcome, "before": before, "after": after,
            "new_strips": new_strips(scene, before),
            "jobs": [job_state(job) for job in scene.understudy_jobs],
            "blend": bpy.data.filepath, **extra}


# --------------------------------------------------------------------------- scenarios


def scenario_install(args: dict) -> dict:
    install(args["zip"])
    import importlib

    link = importlib.import_module(f"{ADDON}.connection.link")
    prefs = bpy.context.preferences.addons[ADDON].preferences
    result = {
        "operators": [hasattr(bpy.ops.understudy, name)
                      for name in ("transfer", "cancel", "collect", "test_connection")],
        "panel": hasattr(bpy.types, "UNDERSTUDY_PT_panel"),
        "address": prefs.server_address,
        "client_module": link.client_api().__name__,
        "scene_settings": bpy.context.scene.understudy.steps,
    }
    bpy.ops.preferences.addon_disable(module=ADDON)
    result["disabled"] = ADDON not in bpy.context.preferences.addons
    result["panel_after_disable"] = hasattr(bpy.types, "UNDERSTUDY_PT_panel")
    return result


def scenario_transfer(args: dict) -> dict:
    """A trimmed movie strip (or a meta/scene strip made from it) through the operator."""
    install(args["zip"])
    configure(args)
    scene = bpy.context.scene
    small_settings(scene, args.get("settings"))
    source = movie_strip(scene, args["clip"], trim=tuple(args.get("trim", (3, 4))))
    if args.get("blocker"):  # a strip right above the source: the result must skip it
        strips(scene).new_movie("blocker", args["clip"], source.channel + 1, 10)
    kind = args.get("kind", "movie")
    if kind == "meta":
        scene.sequence_editor.active_strip = source
        source.select = True
        # 5.0 runs sequencer operators on context.sequencer_scene, unset in background mode.
        override = {"sequencer_scene": scene} if hasattr(bpy.context, "sequencer_scene") else {}
        with bpy.context.temp_override(**override):
            bpy.ops.sequencer.meta_make()
        source = scene.sequence_editor.active_strip
    elif kind == "scene":
        inner = bpy.data.scenes.new("inner")
        inner.render.resolution_x, inner.render.resolution_y = 160, 128
        inner.frame_start, inner.frame_end = 1, 30
        inner_editor = inner.sequence_editor_create()
        (inner_editor.strips if hasattr(inner_editor, "strips") else inner_editor.sequences) \
            .new_movie("inner clip", args["clip"], 1, 1)
        source.mute = True  # keep the movie strip out of the picture; the scene strip shows it
        holder = strips(scene).new_scene("scene source", inner, 4, 5)
        holder.scene_input = "SEQUENCER"
        holder.frame_offset_start, holder.frame_offset_end = 2, 5
        scene.sequence_editor.active_strip = holder
        source = holder
    elif kind == "images":  # an image sequence, fit to the canvas when it is made
        source.mute = True
        files = sorted(Path(args["images"]).glob("*.png"))
        source = strips(scene).new_image("images", str(files[0]), 3, 1, fit_method="FIT")
        for file in files[1:]:
            source.elements.append(file.name)
        scene.sequence_editor.active_strip = source
    elif kind == "color":
        source.mute = True
        source = new_effect(scene, "colour", "COLOR", 3, 1, 20)
        scene.sequence_editor.active_strip = source
    if args.get("fed_effect"):  # an effect strip above that takes the source as its input
        new_effect(scene, "blur", "GAUSSIAN_BLUR", source.channel + 2, 1, 40, input1=source)
    if args.get("fill_above"):  # every channel above the source busy over its range
        for channel in range(source.channel + 1, 129):
            new_effect(scene, f"busy {channel}", "COLOR", channel, 1, 40)
    if args.get("save"):
        bpy.ops.wm.save_as_mainfile(filepath=args["save"])
        if args.get("folder_taken"):  # a file where the result folder would go
            Path(args["save"]).with_name("understudy").write_text("not a folder")
    before = scene_state(scene)
    source_name = source.name
    outcome = run_operator(bpy.ops.understudy.transfer, prompt=args.get("prompt", "a red fox"),
                           wait=args.get("wait", True))
    if args.get("cancel"):
        if args.get("cancel_once_running"):
            wait_for_progress(scene.understudy_jobs[-1])
        outcome["cancel"] = run_operator(bpy.ops.understudy.cancel)
        outcome["cancelled_job"] = job_state(scene.understudy_jobs[-1])
        outcome["collect"] = run_operator(bpy.ops.understudy.collect)
    if args.get("kill_pid"):  # the server dies while the job runs
        import os
        import signal

        os.kill(args["kill_pid"], signal.SIGKILL)
        jobs = importlib.import_module(f"{ADDON}.job_flow.jobs")
        following = importlib.import_module(f"{ADDON}.job_flow.following")
        messages = importlib.import_module(f"{ADDON}.rules.messages")
        states = importlib.import_module(f"{ADDON}.rules.states")
        job = scene.understudy_jobs[-1]
        # The interface's polling timer notices first (ticked here as Blender would) ...
        deadline = time.monotonic() + 60
        while job.phase != states.Phase.WAITING and time.monotonic() < deadline:
            jobs.poll_once()
            time.sleep(following.POLL_INTERVAL_S)
        extra = {"interface": [job.phase, job.message,
                               messages.progress_text(job.status, job.phase, job.percent)]}
        # ... then Collect Results, which in background mode waits and gives up.
        outcome["collect"] = run_operator(bpy.ops.understudy.collect)
        extra["progress"] = messages.progress_text(job.status, job.phase, job.percent)
    else:
        extra = {}
    if args.get("block_then_collect"):  # every channel above is taken while the job runs
        blockers = [new_effect(scene, f"late blocker {channel}", "COLOR", channel, 1, 40)
                    for channel in range(source.channel + 1, 129)]
        outcome["blocked"] = run_operator(bpy.ops.understudy.collect)
        outcome["blocked_job"] = job_state(scene.understudy_jobs[-1])
        for blocker in blockers:
            strips(scene).remove(blocker)
        outcome["collect"] = run_operator(bpy.ops.understudy.collect)
    if args.get("save_after"):
        bpy.ops.wm.save_as_mainfile(filepath=args["save_after"])
    return finish(scene, before, outcome, source=source_name, **extra)


def wait_for_progress(job, timeout_s: float = 300.0) -> None:
    """Block until the server reports progress on the job: a real event saying it runs.
    The timeout only turns a hang into a failure."""
    following = importlib.import_module(f"{ADDON}.job_flow.following")
    client, _ = following.client_for_job(job)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(event.get("job_id") == job.job_id and event.get("type") == "progress"
               for event in client.poll(0.5)):
            return
    raise AssertionError(f"no progress event for {job.job_id} within {timeout_s} s")


def untouched(state: dict) -> dict:
    return {key: value for key, value in state.items() if key != "jobs"}


def scenario_interface_polling(args: dict) -> dict:
    """The interface's path: render in batches from the render timer, submit, then follow
    the job from the polling timer, each ticked the way Blender's timers would (timers
    never fire in background mode, so the scenario calls the timer functions itself).
    Then a second transfer is cancelled between two batches."""
    install(args["zip"])
    addon = importlib.import_module(f"{ADDON}.addon")
    jobs = importlib.import_module(f"{ADDON}.job_flow.jobs")
    following = importlib.import_module(f"{ADDON}.job_flow.following")
    batches = importlib.import_module(f"{ADDON}.job_flow.batches")
    addon.BATCHED = True  # the interface's path: work in timer ticks
    configure(args)
    scene = bpy.context.scene
    small_settings(scene, args.get("settings"))
    movie_strip(scene, args["clip"])
    before = scene_state(scene)
    session = jobs.start_render(bpy.context, "a red fox", tick_budget_s=batches.TICK_BUDGET_S)
    jobs.work_in_batches()
    render_timer = bpy.app.timers.is_registered(jobs.work_tick)
    ticks = []
    while True:
        started = time.perf_counter()
        interval = jobs.work_tick()
        job = scene.understudy_jobs[0]
        ticks.append({"seconds": time.perf_counter() - started, "status": job.status,
                      "percent": job.percent, "frames": session.renderer.done,
                      "scene_as_before": untouched(scene_state(scene)) == untouched(before)})
        if interval is None:
            break
    outcome = {"ok": scene.understudy_jobs[0].status == "submitted"}
    timer_registered = bpy.app.timers.is_registered(jobs.poll_once)
    applied = []  # (event type or job state, the record's status after it), per message
    apply_reply = jobs.apply_reply

    def recording_apply(scene_, job_, client, reply):
        try:
            apply_reply(scene_, job_, client, reply)
        finally:
            applied.append([str(reply.get("type", reply.get("state"))), str(job_.status)])

    jobs.apply_reply = recording_apply
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # both timers, as Blender would run them
        polling, working = jobs.poll_once(), jobs.work_tick()
        job = scene.understudy_jobs[0]
        seen.append([job.status, job.phase, round(job.percent)])
        if polling is None and working is None:
            break
        if working is None:
            time.sleep(following.POLL_INTERVAL_S)
    jobs.apply_reply = apply_reply
    result = finish(scene, before, outcome, timer_registered=timer_registered,
                    render_timer=render_timer, ticks=ticks, seen=seen, applied=applied)
    # Cancel between batches: one batch rendered, then Cancel, then the next tick.
    second = jobs.start_render(bpy.context, "a blue fox", tick_budget_s=batches.TICK_BUDGET_S)
    jobs.work_in_batches()
    jobs.work_tick()
    rendered_before_cancel = second.renderer.done
    cancel = run_operator(bpy.ops.understudy.cancel)
    after_cancel = jobs.work_tick()
    cancelled = job_state(scene.understudy_jobs[-1])
    result["cancel"] = {"outcome": cancel, "rendered": rendered_before_cancel,
                        "total": second.renderer.total, "tick_after": after_cancel,
                        "job": cancelled,
                        "folder_left": Path(cancelled["frames_path"]).exists()}
    # Saved while a third strip renders, then reopened: that job was never sent.
    third = jobs.start_render(bpy.context, "a green fox", tick_budget_s=batches.TICK_BUDGET_S)
    jobs.work_tick()
    rendering_status = job_state(scene.understudy_jobs[-1])["status"]
    blend = str(Path(args["out"]) / "while-rendering.blend")
    bpy.ops.wm.save_as_mainfile(filepath=blend)
    bpy.ops.wm.open_mainfile(filepath=blend)
    reopened = job_state(bpy.context.scene.understudy_jobs[-1])
    result["reopened"] = {"before": rendering_status, "job": reopened, "id": third.job_id,
                          "render_timer_idle": jobs.work_tick() is None}
    return result


class FakeLayout:
    """Stands in for bpy.types.UILayout (nothing draws in background mode): checks that
    every property and operator a panel names exists, and records the labels."""

    def __init__(self, log: dict) -> None:
        self.log = log

    def prop(self, data, name, **_):
        real = getattr(data, "real", data)
        assert name in real.bl_rna.properties, name
        self.log["props"].append(name)

    def operator(self, idname, **_):
        group, name = idname.split(".")
        assert hasattr(getattr(bpy.ops, group), name), idname
        self.log["operators"].append(idname)
        return type("OperatorProperties", (), {})()

    def label(self, text="", **_):
        self.log["labels"].append(text)

    def progress(self, text="", factor=0.0, **_):
        self.log["progress"].append([text, factor])

    def prop_search(self, data, name, search_data, search_name, **_):
        assert name in data.bl_rna.properties and search_name in search_data.bl_rna.properties
        self.log["props"].append(name)

    def template_ID_preview(self, data, name, open="", **_):
        assert name in data.bl_rna.properties, name
        if open:
            group, operator = open.split(".")
            assert hasattr(getattr(bpy.ops, group), operator), open
        self.log["props"].append(name)

    def template_list(self, list_type, _id, data, prop, active_data, active_prop, **_):
        assert hasattr(bpy.types, list_type) and prop in data.bl_rna.properties
        self.log["lists"].append(prop)

    def template_icon(self, icon_value=0, **_):
        assert isinstance(icon_value, int) and icon_value > 0, icon_value

    def row(self, **_):
        return self

    column = box = grid_flow = row


class Drawable:
    """A panel or preferences instance with a fake layout, reading the real data."""

    def __init__(self, cls, real, layout) -> None:
        self.cls, self.real, self.layout = cls, real, layout

    def __getattr__(self, name):
        import types

        method = getattr(self.cls, name, None)
        if isinstance(method, types.FunctionType):  # the class's own helpers, bound to us
            return types.MethodType(method, self)
        return getattr(self.real, name)


def render_composite(scene, path: str, frame: int, color_mode: str = "RGB") -> str:
    """The edit as Blender renders it (every channel), as an 8-bit PNG."""
    kept = scene.frame_current, scene.render.filepath
    scene.frame_set(frame)
    scene.render.use_sequencer = True
    scene.render.filepath = path
    image = scene.render.image_settings
    if hasattr(image, "media_type"):
        image.media_type = "IMAGE"
    image.file_format, image.color_mode = "PNG", color_mode
    scene.view_settings.view_transform = "Standard"
    bpy.ops.render.render(write_still=True)
    scene.frame_set(kept[0])
    scene.render.filepath = kept[1]
    return path


def scenario_composite(args: dict) -> dict:
    """The source over a green background with a black-and-white adjustment layer above:
    a picture-in-picture movie strip ("pip") or a text strip ("text"). Renders the edit
    before and after the transfer."""
    install(args["zip"])
    configure(args)
    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y = 160, 128
    scene.render.resolution_percentage = 100
    small_settings(scene)
    editor = scene.sequence_editor_create()
    background = strips(scene).new_image("background", args["background"], 1, 1,
                                         fit_method="STRETCH")
    background.frame_final_duration = 40
    if args["kind"] == "pip":
        source = movie_strip(scene, args["clip"])
        source.transform.scale_x = source.transform.scale_y = 0.5
        source.transform.offset_x, source.transform.offset_y = 30, 20
    else:
        source = new_effect(scene, "title", "TEXT", 2, 4, 23)
        source.text, source.font_size = "Hi", 60
        editor.active_strip = source
    grade = new_effect(scene, "black and white", "ADJUSTMENT", 5, 1, 40)
    grade.color_saturation = 0.0
    frame = source.frame_final_start + 5
    out = Path(args["out"])
    before_png = render_composite(scene, str(out / "before.png"), frame)
    before = scene_state(scene)
    outcome = run_operator(bpy.ops.understudy.transfer, prompt="a red fox")
    after_png = render_composite(scene, str(out / "after.png"), frame)
    return finish(scene, before, outcome, before_png=before_png, after_png=after_png,
                  source=source.name)


def new_mask(name: str, corners: list[tuple[float, float]]):
    """A Mask data-block with one closed polygon (corners in the mask's 0..1 space);
    no corners: a mask with no shapes."""
    mask = bpy.data.masks.new(name)
    if corners:
        spline = mask.layers.new(name="subject").splines.new()
        spline.points.add(len(corners) - 1)
        for point, corner in zip(spline.points, corners, strict=True):
            point.co, point.handle_type = corner, "VECTOR"
    return mask


def scenario_region(args: dict) -> dict:
    """Keep the plate: a movie strip with a region. Each entry of args["masks"] is one
    Transfer: a Mask data-block ("square", or "empty": no shapes) or a matte strip
    ("white strip": white over the whole picture); the edit is rendered before and after
    (every channel) to compare pixels."""
    install(args["zip"])
    configure(args)
    bpy.context.preferences.addons[ADDON].preferences.max_render_size = 160  # no rescaling
    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y = 160, 128
    scene.render.resolution_percentage = 100
    small_settings(scene, {"region_grow": 4, "region_feather": 2})
    source = movie_strip(scene, args["clip"])
    shapes = {"square": [(0.35, 0.35), (0.65, 0.35), (0.65, 0.65), (0.35, 0.65)], "empty": []}
    frame = source.frame_final_start + 5
    out = Path(args["out"])
    runs = []
    for kind in args["masks"]:
        if kind == "white strip":  # a matte strip that is white over the whole picture
            matte = new_effect(scene, kind, "COLOR", source.channel + 3, 1, 40)
            matte.color = (1.0, 1.0, 1.0)
            matte.mute = True  # a matte is not part of the edit; it renders all the same
            scene.understudy.region_kind, scene.understudy.region_strip = "STRIP", kind
        else:
            scene.understudy.region_kind = "MASK"
            scene.understudy.region_mask = new_mask(kind, shapes[kind])
        before_png = render_composite(scene, str(out / f"{kind}-before.png"), frame, "RGBA")
        before = scene_state(scene)
        outcome = run_operator(bpy.ops.understudy.transfer, prompt="a red fox")
        after_png = render_composite(scene, str(out / f"{kind}-after.png"), frame, "RGBA")
        runs.append(finish(scene, before, outcome, before_png=before_png, after_png=after_png,
                           frame_index=frame - source.frame_final_start))
    return {"runs": runs, "source": source.name}


def scenario_look(args: dict) -> dict:
    """The new subject's look from an image strip at the current frame: a movie strip to
    edit, and above it a muted image strip showing the picture, picked as the Look."""
    install(args["zip"])
    configure(args)
    scene = bpy.context.scene
    small_settings(scene)
    source = movie_strip(scene, args["clip"])
    picture = strips(scene).new_image("look picture", args["look"], source.channel + 3, 1)
    picture.frame_final_duration = 40
    picture.mute = True  # a Look is not part of the edit's picture
    scene.frame_current = 10
    scene.understudy.look_kind, scene.understudy.look_strip = "STRIP", picture.name
    scene.understudy.reference_strength = 0.8
    scene.sequence_editor.active_strip = source
    before = scene_state(scene)
    outcome = run_operator(bpy.ops.understudy.transfer, prompt="a red fox")
    return finish(scene, before, outcome, source=source.name)


def scenario_region_interface(args: dict) -> dict:
    """The interface's path with a Mask region: the region renders in batches first,
    then the strip, each ticked as Blender's timers would; then the job is followed."""
    install(args["zip"])
    addon = importlib.import_module(f"{ADDON}.addon")
    jobs = importlib.import_module(f"{ADDON}.job_flow.jobs")
    following = importlib.import_module(f"{ADDON}.job_flow.following")
    batches = importlib.import_module(f"{ADDON}.job_flow.batches")
    addon.BATCHED = True
    configure(args)
    scene = bpy.context.scene
    small_settings(scene, {"region_grow": 4, "region_feather": 2})
    movie_strip(scene, args["clip"])
    scene.understudy.region_kind = "MASK"
    scene.understudy.region_mask = new_mask("subject", [(0.35, 0.35), (0.65, 0.35),
                                                        (0.65, 0.65), (0.35, 0.65)])
    before = scene_state(scene)
    session = jobs.start_render(bpy.context, "a red fox", tick_budget_s=batches.TICK_BUDGET_S)
    jobs.work_in_batches()
    ticks = []
    while True:
        interval = jobs.work_tick()
        job = scene.understudy_jobs[0]
        ticks.append({"region": session.region_renderer.done, "frames": session.renderer.done,
                      "percent": job.percent, "status": job.status,
                      "scene_as_before": untouched(scene_state(scene)) == untouched(before)})
        if interval is None:
            break
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        polling, working = jobs.poll_once(), jobs.work_tick()
        if polling is None and working is None:
            break
        if working is None:
            time.sleep(following.POLL_INTERVAL_S)
    return finish(scene, before, {"ok": True}, ticks=ticks)


def run_timers(jobs, following, timeout_s: float = 180.0) -> None:
    """Tick the work and polling timers as Blender would until both stop (timers never
    fire in background mode). The timeout only turns a hang into a failure."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        working = jobs.work_tick()  # first: the render it ends starts the following
        polling = jobs.poll_once()
        if polling is None and working is None:
            return
        if working is None:
            time.sleep(following.POLL_INTERVAL_S)
    raise AssertionError(f"the jobs did not end within {timeout_s} s")


def all_strip_states(scene) -> dict:
    """Every strip, those inside meta strips too, by name."""
    editor = scene.sequence_editor
    every = editor.strips_all if hasattr(editor, "strips_all") else editor.sequences_all
    return {strip.name: strip_state(strip) for strip in every}


def stack_state(stack_module, holder) -> dict:
    """A take stack: the meta strip, and its take strips by take number."""
    return {"stack": strip_state(holder),
            "takes": {str(number): strip_state(strip)
                      for number, strip in sorted(stack_module.take_strips(holder).items())},
            "shown": stack_module.shown_take(holder)}


def scenario_takes(args: dict) -> dict:
    """Preview with Takes 3 through the interface's path (timers ticked as Blender would):
    each take lands in one stack as soon as its take_ready is applied; Next and Previous
    switch the visible take; Render Final on the visible take replaces it in place; one
    undo shows the preview again."""
    install(args["zip"])
    addon = importlib.import_module(f"{ADDON}.addon")
    jobs = importlib.import_module(f"{ADDON}.job_flow.jobs")
    following = importlib.import_module(f"{ADDON}.job_flow.following")
    stack = importlib.import_module(f"{ADDON}.vse.stack")
    contact_sheet = importlib.import_module(f"{ADDON}.interface.contact_sheet")
    addon.BATCHED = True  # the interface's path: work in timer ticks
    configure(args)
    scene = bpy.context.scene
    small_settings(scene, {"takes": args["takes"]})
    source = movie_strip(scene, args["clip"])
    source.blend_alpha = 0.75  # the stack blends like the source; its takes do not again
    before = scene_state(scene)
    landed = []  # per server message applied: its kind, take, and the takes in the stack then
    apply_reply = jobs.apply_reply

    def recording_apply(scene_, job_, client, reply):
        try:
            apply_reply(scene_, job_, client, reply)
        finally:
            holder = stack.find_stack(scene_, job_.job_id)
            landed.append([str(reply.get("type", reply.get("state"))), reply.get("take"),
                           sorted(stack.take_strips(holder)) if holder is not None else []])

    jobs.apply_reply = recording_apply
    # Events only. A status reply (asked every STATUS_EVERY_S, the path for missed events)
    # can say "done" while take 3's take_ready, come in during that request, still waits
    # in the client's queue (or was lost: a status request timed out on a loaded machine
    # and the client reconnected); the reply places take 3 and ends the job, and that
    # take_ready is never applied. This client submitted the job, so every event reaches it (which takes a
    # status reply places: test_blender_takes.py).
    status_every_s, following.STATUS_EVERY_S = following.STATUS_EVERY_S, float("inf")
    outcome = run_operator(bpy.ops.understudy.transfer, prompt="a red fox", quality="preview")
    run_timers(jobs, following)
    jobs.apply_reply, following.STATUS_EVERY_S = apply_reply, status_every_s
    preview_job = scene.understudy_jobs[0]
    preview_id = preview_job.job_id  # the record itself is gone once undo reloads the file
    holder = stack.find_stack(scene, preview_id)
    result = finish(scene, before, outcome, landed=landed)
    if holder is None:  # nothing landed: the rest has nothing to act on
        return result
    result["stack"] = stack_state(stack, holder)
    result["take_records"] = [[record.number, record.seed, record.quality, record.prompt]
                              for record in preview_job.take_records]
    result["contact_sheet"] = [list(contact_sheet.preview(strip).image_size)
                               for _, strip in sorted(stack.take_strips(holder).items())]

    # The panel with the stack active: its takes, the buttons, the contact sheet.
    scene.sequence_editor.active_strip = holder
    log = {"props": [], "operators": [], "labels": [], "progress": [], "lists": []}
    panel = bpy.types.UNDERSTUDY_PT_panel
    panel.draw(Drawable(panel, None, FakeLayout(log)), bpy.context)
    result["panel"] = log

    # Next, then Previous: the visible take changes and nothing else.
    switching = {"before": all_strip_states(scene)}
    switching["next"] = run_operator(bpy.ops.understudy.next_take)
    switching["after_next"] = all_strip_states(scene)
    switching["shown_after_next"] = stack.shown_take(holder)
    switching["previous"] = run_operator(bpy.ops.understudy.previous_take)
    switching["after_previous"] = all_strip_states(scene)
    switching["shown_after_previous"] = stack.shown_take(holder)
    result["switching"] = switching

    # Render Final on the visible take (the last one: Previous from the first goes round).
    run_operator(bpy.ops.understudy.previous_take)
    shown = stack.shown_take(holder)
    preview_state = stack_state(stack, holder)
    final = {"shown": shown, "outcome": run_operator(bpy.ops.understudy.render_final)}
    run_timers(jobs, following)
    scene = bpy.context.scene
    holder = stack.find_stack(scene, preview_id)
    final["job"] = job_state(scene.understudy_jobs[-1])
    final["preview"] = preview_state
    final["after"] = stack_state(stack, holder)
    record = jobs.take_record(scene.understudy_jobs[0], shown)
    final["record"] = None if record is None else [record.quality, record.final_job]
    bpy.ops.ed.undo()
    scene = bpy.context.scene
    final["undone"] = stack_state(stack, stack.find_stack(scene, preview_id))
    final["undone_jobs"] = [job_state(job) for job in scene.understudy_jobs]
    result["final"] = final
    return result


def scenario_area(args: dict) -> dict:
    """A movie strip fit into a project of another shape; renders the source alone and the
    result alone (RGBA, transparent where nothing is drawn) to compare the areas covered."""
    install(args["zip"])
    configure(args)
    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y = args["canvas"]
    scene.render.resolution_percentage = 100
    small_settings(scene, args.get("settings"))
    source = movie_strip(scene, args["clip"])  # fit to this canvas when it is made
    if args.get("scale"):  # shown smaller than the canvas, so its own shape shows
        source.transform.scale_x *= args["scale"]
        source.transform.scale_y *= args["scale"]
    before = scene_state(scene)
    outcome = run_operator(bpy.ops.understudy.transfer, prompt="a red fox")
    result = finish(scene, before, outcome)
    if not outcome["ok"]:
        return result
    [new] = [strip for strip in strips(scene) if strip.name not in {"source"}]
    frame = source.frame_final_start + 3
    out = Path(args["out"])
    new.mute = True
    result["source_png"] = render_composite(scene, str(out / "source.png"), frame, "RGBA")
    new.mute, source.mute = False, True
    result["result_png"] = render_composite(scene, str(out / "result.png"), frame, "RGBA")
    return result


def scenario_draw(args: dict) -> dict:
    """Draw the sidebar panel (with a running and a finished job) and the preferences."""
    install(args["zip"])
    scene = bpy.context.scene
    scene.sequence_editor_create()
    scene.understudy.show_advanced = True
    rendering = scene.understudy_jobs.add()
    rendering.job_id, rendering.status, rendering.phase = "us-0", "rendering", "rendering"
    rendering.percent = 25
    running, done = scene.understudy_jobs.add(), scene.understudy_jobs.add()
    running.job_id, running.status, running.phase, running.percent = "us-1", "running", "guide", 40
    done.job_id, done.status, done.seed, done.prompt = "us-2", "done", "7", "a fox"
    done.sidecar = json.dumps({
        "version": 1, "settings": {"steps": 3, "guided_steps": None}, "seed": 7, "model": "tiny",
        "steps": 3, "guided_steps": 2, "device": "cpu", "dtype": "float32",
        "input_frame_indices": [0, 1], "windows": [[0, 2]], "inversion_from_cache": True,
        "timings_s": {"sample": 1.25, "decode": 0.25},
        "regions": {"count": 1, "grow": 16, "feather": 8, "motion": "subject",
                    "composited": True}})
    scene.understudy_job_index = 2
    scene.understudy.region_kind, scene.understudy.region_strip = "STRIP", "dog matte"
    scene.understudy.look_kind = "IMAGE"
    scene.understudy.look_image = bpy.data.images.new("mascot sheet", 32, 32)
    log = {"props": [], "operators": [], "labels": [], "progress": [], "lists": []}
    layout = FakeLayout(log)
    panel = bpy.types.UNDERSTUDY_PT_panel
    assert panel.poll(bpy.context)
    panel.draw(Drawable(panel, None, layout), bpy.context)
    prefs = bpy.context.preferences.addons[ADDON].preferences
    for kind in ("LOCAL", "SERVER"):  # "this computer" (the default), then "a server"
        prefs.backend_kind = kind
        type(prefs).draw(Drawable(type(prefs), prefs, layout), bpy.context)
    return log


def scenario_make_room(args: dict) -> dict:
    """A clip with its grade on the channel right above and a title above that: Transfer is
    refused and the panel offers Make Room; Make Room moves them and transfers; undo puts
    every strip back."""
    install(args["zip"])
    configure(args)
    scene = bpy.context.scene
    small_settings(scene)
    source = movie_strip(scene, args["clip"], trim=(0, 0))
    new_effect(scene, "grade", "ADJUSTMENT", 3, 1, 40)
    new_effect(scene, "title", "COLOR", 4, 1, 40)
    new_effect(scene, "later", "COLOR", 4, 100, 20)  # not over the clip's frames: stays
    scene.sequence_editor.active_strip = source

    def channels() -> dict:
        return {strip.name: strip.channel for strip in strips(scene)}

    before = scene_state(scene)
    refused = run_operator(bpy.ops.understudy.transfer, prompt="a red fox")
    refused["channels"] = channels()
    log = {"props": [], "operators": [], "labels": [], "progress": [], "lists": []}
    panel = bpy.types.UNDERSTUDY_PT_panel
    panel.draw(Drawable(panel, None, FakeLayout(log)), bpy.context)
    refused["offered"] = "understudy.make_room" in log["operators"]
    bpy.ops.ed.undo_push(message="before Make Room")
    outcome = run_operator(bpy.ops.understudy.make_room, prompt="a red fox")
    result = finish(scene, before, outcome, refused=refused, moved=channels())
    # A click on an UNDO operator pushes one undo step after it; bpy.ops from a script
    # never does (the script's caller owns undo), so the scenario pushes it as the click would.
    bpy.ops.ed.undo_push(message="Make Room")
    bpy.ops.ed.undo()
    scene = bpy.context.scene
    result["undone"] = channels()
    return result


def scenario_nothing_selected(args: dict) -> dict:
    install(args["zip"])
    configure(args)
    scene = bpy.context.scene
    source = movie_strip(scene, args["clip"])
    scene.sequence_editor.active_strip = None
    source.select = False
    before = scene_state(scene)
    return finish(scene, before, run_operator(bpy.ops.understudy.transfer, prompt="a red fox"))


def scenario_reopen(args: dict) -> dict:
    """Open a saved file whose job was still running; loading collects the result."""
    install(args["zip"])
    configure(args)
    bpy.ops.wm.open_mainfile(filepath=args["blend"])
    scene = bpy.context.scene
    return {"jobs": [job_state(job) for job in scene.understudy_jobs],
            "strips": [strip_state(s) for s in strips(scene)]}


def scenario_test_connection(args: dict) -> dict:
    install(args["zip"])
    configure(args)
    outcome = run_operator(bpy.ops.understudy.test_connection)
    prefs = bpy.context.preferences.addons[ADDON].preferences
    return {"outcome": outcome, "report": prefs.connection_report}


def scenario_check_memory(args: dict) -> dict:
    """Check GPU Memory on a trimmed movie strip: the panel's line from the server's plan."""
    install(args["zip"])
    configure(args)
    scene = bpy.context.scene
    small_settings(scene)
    movie_strip(scene, args["clip"])
    gate = Path(args["gate"])  # the server holds each plan until this file appears
    pending = run_operator(bpy.ops.understudy.check_memory)  # held: the panel does not wait
    released = threading.Event()

    def release_every_plan() -> None:  # each plan takes (deletes) the gate; put it back
        while not released.wait(0.02):
            if not gate.exists():
                gate.write_text("go")

    releaser = threading.Thread(target=release_every_plan)
    releaser.start()
    try:
        while True:  # press again until the plan is made, however long the CPU takes
            outcome = run_operator(bpy.ops.understudy.check_memory)
            if outcome["ok"] or "still working out" not in outcome.get("error", ""):
                break
    finally:
        released.set()
        releaser.join()
    return {"pending": pending, "outcome": outcome, "report": scene.understudy.memory_report}


def configure_local(args: dict):
    """Preferences for "this computer": the project, the tiny model on the CPU, a state
    folder of the test's own; the project is checked as it is entered."""
    prefs = bpy.context.preferences.addons[ADDON].preferences
    prefs.local_model, prefs.local_device = "tiny", "cpu"
    prefs.local_state_dir = args["state_dir"]
    prefs.local_cache_dir = args.get("cache_dir", "")
    prefs.local_extra_args = args.get("extra_args", "")
    prefs.keep_running = args.get("keep_running", False)
    prefs.project_path = args["project"]  # last: entering it runs the check
    return prefs


def scenario_local(args: dict) -> dict:
    """"This computer": a transfer (or Test Connection) with the extension's own backend,
    then optionally Stop and disabling the extension. Reports the backend it used."""
    install(args["zip"])
    configure(args)
    prefs = configure_local(args)
    jobs = importlib.import_module(f"{ADDON}.job_flow.jobs")
    local_backend = importlib.import_module(f"{ADDON}.connection.local")
    backend = local_backend.BACKEND
    scene = bpy.context.scene
    small_settings(scene, args.get("settings"))
    movie_strip(scene, args["clip"])
    before = scene_state(scene)
    if args.get("action", "transfer") == "transfer":
        outcome = run_operator(bpy.ops.understudy.transfer, prompt="a red fox")
    else:
        outcome = run_operator(bpy.ops.understudy.test_connection)
        outcome["report"] = prefs.connection_report
    used = {"pid": backend.pid, "owned": backend.owned, "state": str(backend.state),
            "status": local_backend.status_lines(bool(jobs.active_jobs())),
            "restarts_left": backend.restarts_left,
            "log": str(backend.log_path) if backend.log_path else ""}
    extra = {"project_report": prefs.project_report, "backend": used}
    if args.get("stop_button"):
        extra["stop"] = run_operator(bpy.ops.understudy.backend_stop)
    result = finish(scene, before, outcome, **extra)
    if args.get("disable"):
        bpy.ops.preferences.addon_disable(module=ADDON)
        result["disabled"] = ADDON not in bpy.context.preferences.addons
        result["alive_after_disable"] = process_exists(used["pid"])
    return result


def scenario_local_interface(args: dict) -> dict:
    """The interface's path with "this computer": Transfer starts the backend and returns at
    once; the backend timer (ticked here as Blender would) starts the render when the
    backend answers, then the work and polling timers carry the job to its result."""
    install(args["zip"])
    addon = importlib.import_module(f"{ADDON}.addon")
    jobs = importlib.import_module(f"{ADDON}.job_flow.jobs")
    following = importlib.import_module(f"{ADDON}.job_flow.following")
    local_backend = importlib.import_module(f"{ADDON}.connection.local")
    addon.BATCHED = True  # the interface's path: timers, never blocking
    configure(args)
    configure_local(args)
    scene = bpy.context.scene
    small_settings(scene, args.get("settings"))
    movie_strip(scene, args["clip"])
    before = scene_state(scene)
    outcome = run_operator(bpy.ops.understudy.transfer, prompt="a red fox")
    right_after = {"state": str(local_backend.BACKEND.state), "jobs": len(scene.understudy_jobs),
                   "timer": bpy.app.timers.is_registered(local_backend.tick)}
    said = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # the three timers, as Blender would run them
        backend_tick, working = local_backend.tick(), jobs.work_tick()
        if scene.understudy_jobs:
            jobs.poll_once()
        line = local_backend.status_lines(bool(jobs.active_jobs()))[0]
        if not said or said[-1] != line:
            said.append(line)
        if scene.understudy_jobs and scene.understudy_jobs[0].status == "done":
            break
        if working is None:
            time.sleep(local_backend.TICK_S if backend_tick else following.POLL_INTERVAL_S)
    return finish(scene, before, outcome, right_after=right_after, said=said)


def process_exists(pid: int) -> bool:
    import os

    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


SCENARIOS = {name[len("scenario_"):]: function for name, function in globals().items()
             if name.startswith("scenario_")}


def main() -> None:
    args = json.loads(sys.argv[-1])
    result = SCENARIOS[args["scenario"]](args)
    result["blender_version"] = list(bpy.app.version)
    print("RESULT_JSON " + json.dumps(result, default=str), flush=True)
    if args.get("result_file"):
        Path(args["result_file"]).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
