"""The backend on this computer, from Blender: preferences, the operators' first step,
the watching timer, stopping it when Blender quits or the extension is disabled.

The decisions live in backend_install.py, backend_lock.py and backend_process.py (plain
Python); this module only reads the
preferences and runs them. Before an operator talks to the server, `prepare` makes
sure something answers: it finds a running backend (another Blender's, or one started
by hand) or starts one. In the interface the operator's work then waits in a list and
a timer runs it once the backend is ready, so Blender never freezes; in background
mode (`blender -b`, the bpy module), where timers never fire, it blocks.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable

import bpy

from . import backend_install, backend_process, jobs, link, plan, props
from .backend_process import BackendState

TICK_S = 0.25  # how often the timer reads the backend's log while it starts or runs
BACKEND = backend_process.LocalBackend()
_installs: dict[str, backend_install.Install] = {}  # entered path -> its checked install
_pending: list[Callable[[], None]] = []  # what the operators asked for, once it is ready
_keep_running = [False]  # the preference, remembered for the moment Blender quits
_last_problem = [""]  # a deferred action's failure, shown in the panel


def install_for(prefs) -> backend_install.Install:
    """The checked project of the preferences (checked once per path entered)."""
    entered = bpy.path.abspath(prefs.project_path) if prefs.project_path else ""
    if entered not in _installs:
        _installs[entered] = backend_install.find_install(entered)
    return _installs[entered]


def check_entered(prefs) -> None:
    """The project folder was entered: check it now and say what was found, or what to do."""
    entered = bpy.path.abspath(prefs.project_path) if prefs.project_path else ""
    _installs.pop(entered, None)
    try:
        install = install_for(prefs)
    except plan.UserError as error:
        prefs.project_report = str(error)
        return
    prefs.project_report = f"Backend found: {install.python}"


def remember(prefs) -> None:
    _keep_running[0] = bool(prefs.keep_running)


def local_settings(prefs) -> backend_install.LocalSettings:
    def folder(path: str) -> str:
        return bpy.path.abspath(path) if path else ""

    return backend_install.LocalSettings(
        address=prefs.server_address, model=prefs.local_model, device=prefs.local_device,
        state_dir=folder(prefs.local_state_dir), cache_dir=folder(prefs.local_cache_dir),
        extra_args=prefs.local_extra_args)


def report_loading(line: str) -> None:
    print(f"Understudy: starting the backend: loading the model ({line})", flush=True)


def prepare(context, then: Callable[[], None] | None = None, start: bool = False) -> bool:
    """Before talking to the server: True when it can be asked now.

    On this computer with nothing answering, a backend is found or started (`start`, or
    "start when needed"); in background mode this blocks until it answers, in the
    interface `then` runs from the timer once it does and this returns False. A project
    that cannot run the backend is refused in one sentence before anything runs."""
    prefs = props.preferences(context)
    if not prefs.local:
        return True
    install = install_for(prefs)
    settings = local_settings(prefs)
    remember(prefs)
    _last_problem[0] = ""
    BACKEND.poll()
    same_place = BACKEND.address == settings.address.strip()
    if BACKEND.owned and BACKEND.running and not same_place:  # the address was changed
        BACKEND.stop()
    if not (BACKEND.running and same_place) and not BACKEND.find(install, settings):
        if not (start or prefs.start_when_needed):
            raise plan.UserError(f"No backend runs at {settings.address}; click Start under "
                                 f"Backend in the Understudy preferences, or turn on Start "
                                 f"when needed.")
        BACKEND.restarts_left = backend_process.RESTARTS
        BACKEND.start(install, settings)
    if BACKEND.answering:
        describe(prefs)
        return True
    if not jobs.BATCHED:
        BACKEND.wait_ready(report_loading)
        describe(prefs)
        return True
    if then is not None:
        _pending.append(then)
    watch()
    return False


def describe(prefs) -> None:
    """Ask the ready backend for its model and device, for the panel (one hello)."""
    config = prefs.server_config()
    try:
        hello = link.guarded(link.client_for(config).hello)
    except plan.UserError:
        link.forget(config)
        return
    _state, BACKEND.detail = backend_process.describe_hello(hello)


def revive() -> bool:
    """Background mode, after the server stopped answering: True when the backend this
    Blender started had exited and was restarted (once) and answers again."""
    if not BACKEND.owned:
        return False
    BACKEND.poll()  # notices the exit and starts it again, once
    if BACKEND.state != BackendState.STARTING:
        return False
    BACKEND.wait_ready(report_loading)
    return True


def tick() -> float | None:
    """The interface's backend timer: read the log, restart a backend that exited on its
    own (once), run what waited for it."""
    state = BACKEND.poll()
    if _pending and BACKEND.answering:
        describe(props.preferences())
        waiting = list(_pending)
        _pending.clear()
        for action in waiting:
            try:
                action()
            except plan.UserError as error:
                _last_problem[0] = str(error)
                print(f"Understudy: {error}", flush=True)
    elif _pending and state not in (BackendState.STARTING,):
        _pending.clear()
        _last_problem[0] = BACKEND.failure()
    jobs.redraw_sequencers()
    return TICK_S if _pending or (BACKEND.owned and BACKEND.running) else None


def watch() -> None:
    if not bpy.app.timers.is_registered(tick):
        bpy.app.timers.register(tick, first_interval=TICK_S)


def status_lines() -> list[str]:
    """What the panel says about the backend: its state, and after an exit the last log
    lines and where the whole log is."""
    if BACKEND.answering:  # busy while this file has jobs on it
        BACKEND.state = BackendState.BUSY if jobs.active_jobs() else BackendState.READY
    lines = [BACKEND.status_text()]
    if _last_problem[0]:
        lines.append(_last_problem[0])
    if BACKEND.state == BackendState.EXITED:
        lines += list(BACKEND.tail)
    return lines


def draw_preferences(prefs, layout) -> None:
    layout.prop(prefs, "project_path")
    if prefs.project_report:
        layout.label(text=prefs.project_report,
                     icon="CHECKMARK" if prefs.project_report.startswith("Backend found")
                     else "ERROR")
    entered = bpy.path.abspath(prefs.project_path) if prefs.project_path else ""
    defaults = _installs[entered].defaults if entered in _installs else {}
    box = layout.box()
    for name, default_key in (("local_model", "model"), ("local_device", ""),
                              ("local_state_dir", "state_dir"), ("local_cache_dir", "cache_dir")):
        box.prop(prefs, name)
        if not getattr(prefs, name) and defaults.get(default_key):
            box.label(text=f"empty: {defaults[default_key]}")
    box.prop(prefs, "local_extra_args")
    row = box.row()
    row.prop(prefs, "vae_slice")
    row.prop(prefs, "gradient_checkpointing")
    row = layout.row()
    row.prop(prefs, "start_when_needed")
    row.prop(prefs, "keep_running")
    row = layout.row(align=True)
    row.operator("understudy.backend_start", icon="PLAY")
    row.operator("understudy.backend_stop", icon="PAUSE")
    row.operator("understudy.backend_restart", icon="FILE_REFRESH")
    for line in status_lines():
        layout.label(text=line)


def stop_owned() -> None:
    """Stop the backend this Blender started, unless it is to keep running; a backend it
    only found is never stopped."""
    _pending.clear()
    if not _keep_running[0]:
        BACKEND.stop()


def quitting() -> None:
    """Blender quits (atexit): the same as disabling the extension."""
    stop_owned()


class UNDERSTUDY_OT_backend_start(bpy.types.Operator):
    """Start the backend on this computer (or use the one that runs already)"""

    bl_idname = "understudy.backend_start"
    bl_label = "Start"

    def execute(self, context):
        from .operators import report_error

        try:
            ready = prepare(context, start=True)
        except plan.UserError as error:
            return report_error(self, error)
        self.report({"INFO"}, BACKEND.status_text() if ready else
                    "Starting the backend: loading the model.")
        return {"FINISHED"}


class UNDERSTUDY_OT_backend_stop(bpy.types.Operator):
    """Stop the backend this Blender started (one it did not start is left running)"""

    bl_idname = "understudy.backend_stop"
    bl_label = "Stop"

    def execute(self, context):
        owned = BACKEND.owned
        address = BACKEND.address
        BACKEND.stop()
        link.close_all()
        self.report({"INFO"}, "Stopped the backend." if owned else
                    f"The backend at {address or 'its address'} was not started by this "
                    f"Blender, so it is left running.")
        return {"FINISHED"}


class UNDERSTUDY_OT_backend_restart(bpy.types.Operator):
    """Stop the backend this Blender started and start it again"""

    bl_idname = "understudy.backend_restart"
    bl_label = "Restart"

    def execute(self, context):
        from .operators import report_error

        if BACKEND.running and not BACKEND.owned:
            return report_error(self, plan.UserError(
                f"The backend at {BACKEND.address} was not started by this Blender; restart "
                f"it where it was started."))
        BACKEND.stop()
        link.close_all()
        try:
            prepare(context, start=True)
        except plan.UserError as error:
            return report_error(self, error)
        return {"FINISHED"}


CLASSES = (UNDERSTUDY_OT_backend_start, UNDERSTUDY_OT_backend_stop,
           UNDERSTUDY_OT_backend_restart)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    atexit.register(quitting)


def unregister() -> None:
    atexit.unregister(quitting)
    if bpy.app.timers.is_registered(tick):
        bpy.app.timers.unregister(tick)
    stop_owned()
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
