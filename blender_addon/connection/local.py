"""The backend on this computer, from Blender: preferences, the operators' first step,
the watching timer, stopping it when Blender quits or the extension is disabled.

The decisions live in install.py, lock.py and process.py (plain Python); this module
only reads the preferences and runs them. Before an operator talks to the server, `prepare` makes
sure something answers: it finds a running backend (another Blender's, or one started
by hand) or starts one. In the interface the operator's work then waits in a list and
a timer runs it once the backend is ready, so Blender never freezes; in background
mode (`blender -b`, the bpy module), where timers never fire, it blocks.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable

import bpy

from .. import addon
from ..rules.errors import UserError
from . import link
from .install import Install, LocalSettings, find_install
from .process import RESTARTS, BackendState, LocalBackend, describe_hello

TICK_S = 0.25  # how often the timer reads the backend's log while it starts or runs
BACKEND = LocalBackend()
_installs: dict[str, Install] = {}  # entered path -> its checked install
_pending: list[Callable[[], None]] = []  # what the operators asked for, once it is ready
_keep_running = [False]  # the preference, remembered for the moment Blender quits
_last_problem = [""]  # a deferred action's failure, shown in the panel


def install_for(prefs) -> Install:
    """The checked project of the preferences (checked once per path entered)."""
    entered = bpy.path.abspath(prefs.project_path) if prefs.project_path else ""
    if entered not in _installs:
        _installs[entered] = find_install(entered)
    return _installs[entered]


def check_entered(prefs) -> None:
    """The project folder was entered: check it now and say what was found, or what to do."""
    entered = bpy.path.abspath(prefs.project_path) if prefs.project_path else ""
    _installs.pop(entered, None)
    try:
        install = install_for(prefs)
    except UserError as error:
        prefs.project_report = str(error)
        return
    prefs.project_report = f"Backend found: {install.python}"


def remember(prefs) -> None:
    _keep_running[0] = bool(prefs.keep_running)


def local_settings(prefs) -> LocalSettings:
    def folder(path: str) -> str:
        return bpy.path.abspath(path) if path else ""

    return LocalSettings(
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
    prefs = addon.preferences(context)
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
            raise UserError(f"No backend runs at {settings.address}; click Start under "
                                 f"Backend in the Understudy preferences, or turn on Start "
                                 f"when needed.")
        BACKEND.restarts_left = RESTARTS
        BACKEND.start(install, settings)
    if BACKEND.answering:
        describe(prefs)
        return True
    if not addon.BATCHED:
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
    except UserError:
        link.forget(config)
        return
    _state, BACKEND.detail = describe_hello(hello)


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
        describe(addon.preferences())
        waiting = list(_pending)
        _pending.clear()
        for action in waiting:
            try:
                action()
            except UserError as error:
                _last_problem[0] = str(error)
                print(f"Understudy: {error}", flush=True)
    elif _pending and state not in (BackendState.STARTING,):
        _pending.clear()
        _last_problem[0] = BACKEND.failure()
    addon.redraw_sequencers()
    return TICK_S if _pending or (BACKEND.owned and BACKEND.running) else None


def watch() -> None:
    if not bpy.app.timers.is_registered(tick):
        bpy.app.timers.register(tick, first_interval=TICK_S)


def status_lines(file_has_jobs: bool) -> list[str]:
    """What the panel says about the backend: its state (busy while the open file has jobs
    on it), and after an exit the last log lines and where the whole log is."""
    if BACKEND.answering:
        BACKEND.state = BackendState.BUSY if file_has_jobs else BackendState.READY
    lines = [BACKEND.status_text()]
    if _last_problem[0]:
        lines.append(_last_problem[0])
    if BACKEND.state == BackendState.EXITED:
        lines += list(BACKEND.tail)
    return lines


def install_defaults(prefs) -> dict:
    """The command line's defaults of the project entered (model, state and cache folders),
    once it has been checked; {} before."""
    entered = bpy.path.abspath(prefs.project_path) if prefs.project_path else ""
    return _installs[entered].defaults if entered in _installs else {}


def stop_owned() -> None:
    """Stop the backend this Blender started, unless it is to keep running; a backend it
    only found is never stopped."""
    _pending.clear()
    if not _keep_running[0]:
        BACKEND.stop()


def quitting() -> None:
    """Blender quits (atexit): the same as disabling the extension."""
    stop_owned()


def register() -> None:
    atexit.register(quitting)


def unregister() -> None:
    atexit.unregister(quitting)
    if bpy.app.timers.is_registered(tick):
        bpy.app.timers.unregister(tick)
    stop_owned()
