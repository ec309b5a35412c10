"""Operators: transfer, make room, cancel, collect, test connection, check GPU memory,
and start, stop or restart the backend on this computer.

Each one's execute is wrapped by `reports_user_errors`, which turns a UserError into a
single-sentence report, so a failure shows up in Blender's interface (or as the
RuntimeError of `bpy.ops…` in a script) and nothing else happens.
"""

import functools
import json

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty

from .. import addon
from ..connection import link
from ..connection import local as local_backend
from ..job_flow import jobs, rendering
from ..job_flow.batches import TICK_BUDGET_S
from ..job_flow.rendering import TransferRequest
from ..rules.channels import NoRoomUnderGrade, make_room
from ..rules.errors import UserError
from ..rules.messages import cancel_report
from ..rules.names import JOB_PROPERTY
from ..rules.panel_settings import SETTINGS
from ..rules.states import Status
from ..rules.takes import FINAL, PREVIEW, final_values, step_take
from ..vse import compat, stack, strip_io


def reports_user_errors(execute):
    """An operator's execute that reports a UserError as its one sentence and ends
    CANCELLED (the one place the operators handle a user's error)."""

    @functools.wraps(execute)
    def guarded_execute(self, context):
        try:
            return execute(self, context)
        except UserError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}

    return guarded_execute


def has_sequencer(context) -> bool:
    scene = compat.sequencer_scene(context)
    return scene is not None and scene.sequence_editor is not None


def render_in_batches(context, request: TransferRequest) -> rendering.RenderSession:
    """Interface: check and start rendering from the work timer, a batch per tick."""
    session = jobs.start_render(context, request, tick_budget_s=TICK_BUDGET_S)
    jobs.work_in_batches()
    return session


QUALITY_ITEMS = [(quality, quality.capitalize(), SETTINGS.spec_of("quality").help)
                 for quality in SETTINGS.spec_of("quality").choices]


class UNDERSTUDY_OT_transfer(bpy.types.Operator):
    """Render the active strip, send it to the Understudy server and add the result above it
    (the panel's Takes: a stack of takes, one per seed)"""

    bl_idname = "understudy.transfer"
    bl_label = "Transfer Motion"

    # SKIP_SAVE: Blender would otherwise reuse a script's prompt for the next button press.
    prompt: StringProperty(name="Prompt", default="", options={"SKIP_SAVE"},
                           description="What the subject should become (default: the panel's)")
    quality: EnumProperty(name="Quality", items=QUALITY_ITEMS, default=FINAL,
                          options={"SKIP_SAVE"},
                          description="Preview: a cheap look first; final: the edit as set")
    wait: BoolProperty(name="Wait in background mode", default=True, options={"SKIP_SAVE"},
                       description="Background mode only: block until the result is in the "
                                   "timeline (the interface never blocks)")

    @classmethod
    def poll(cls, context):
        if has_sequencer(context):
            return True
        cls.poll_message_set("The scene has no sequencer strips; add a strip to transfer first.")
        return False

    @reports_user_errors
    def execute(self, context):
        request = TransferRequest(self.prompt, self.quality,
                                  int(compat.sequencer_scene(context).understudy.takes))
        try:
            return run_transfer(self, context, request, self.wait)
        except NoRoomUnderGrade as error:  # the panel offers Make Room for this strip
            compat.sequencer_scene(context).understudy.room_strip = error.source_name
            raise


def run_transfer(operator, context, request: TransferRequest, wait: bool) -> set[str]:
    """Transfer the active strip (or for Render Final, the preview's source): start the
    backend if needed, render, submit; in background mode also wait for the result
    (unless not `wait`). Raises UserError."""
    compat.sequencer_scene(context).understudy.room_strip = ""
    if request.final_of is None:
        rendering.check_place(context)
    if not local_backend.prepare(context, then=lambda: render_in_batches(bpy.context, request)):
        operator.report({"INFO"}, "Starting the backend: loading the model; the transfer "
                                  "starts when it is ready.")
        return {"FINISHED"}
    if addon.BATCHED:
        session = render_in_batches(context, request)
        operator.report({"INFO"}, f"Rendering {session.renderer.total} frames for "
                                  f"{session.job_id}; {landing_text(request)}.")
        return {"FINISHED"}
    session = jobs.start_render(context, request)
    job_id = session.job_id
    jobs.render_blocking(session)
    if not wait:
        return {"FINISHED"}
    scene, job = jobs.find_job(job_id)
    jobs.wait_and_collect(scene, job, addon.preferences(context).job_timeout_s)
    operator.report({"INFO"}, f"Added strip {job.result_strip!r} (seed {job.seed})." if
                    job.status == Status.DONE else f"{job.job_id}: {job.status}.")
    if job.message:  # the file is unsaved: the frames went to a temporary folder
        operator.report({"WARNING"}, job.message)
    return {"FINISHED"}


class UNDERSTUDY_OT_make_room(bpy.types.Operator):
    """Move the adjustment layer over the active strip, and everything above it over the
    strip's frames, up one channel, then transfer: the result goes under the grade"""

    bl_idname = "understudy.make_room"
    bl_label = "Make Room"
    bl_options = {"REGISTER", "UNDO"}  # the moves and the transfer are one undo step

    prompt: StringProperty(name="Prompt", default="", options={"SKIP_SAVE"},
                           description="What the subject should become (default: the panel's)")
    wait: BoolProperty(name="Wait in background mode", default=True, options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        return has_sequencer(context)

    @reports_user_errors
    def execute(self, context):
        scene = compat.sequencer_scene(context)
        strip = strip_io.source_strip(scene)
        moves = make_room(strip_io.strip_span(strip), strip.name, strip_io.neighbours(scene))
        if not moves:
            scene.understudy.room_strip = ""
            raise UserError(f"No adjustment layer is in the way of {strip.name!r}'s result; "
                                 f"click Transfer Motion.")
        by_name = {other.name: other for other in compat.top_strips(scene.sequence_editor)}
        before = {name: by_name[name].channel for name, _ in moves}
        for name, channel in moves:  # highest first: no strip ever lands on another
            by_name[name].channel = channel
        jobs_before = len(scene.understudy_jobs)
        request = TransferRequest(self.prompt, takes=int(scene.understudy.takes))
        try:
            return run_transfer(self, context, request, self.wait)
        except UserError:
            if len(scene.understudy_jobs) == jobs_before:  # refused before any work: undo
                for name, _ in reversed(moves):  # lowest first, back down
                    by_name[name].channel = before[name]
            raise


def chosen_job(context, job_id: str):
    """The named job, else the newest unfinished job of the sequencer's scene."""
    if job_id:
        scene, job = jobs.find_job(job_id)
        if job is None:
            raise UserError(f"There is no job {job_id!r} in this file.")
        return scene, job
    scene = compat.sequencer_scene(context)
    for job in reversed(scene.understudy_jobs):
        if job.cancellable:
            return scene, job
    raise UserError("No Understudy job is running in this scene.")


class UNDERSTUDY_OT_cancel(bpy.types.Operator):
    """Cancel an Understudy job (the newest running one unless a job id is given)"""

    bl_idname = "understudy.cancel"
    bl_label = "Cancel"

    job_id: StringProperty(name="Job", default="", options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        if jobs.any_job(lambda job: job.cancellable):
            return True
        cls.poll_message_set("No Understudy job is rendering or running.")
        return False

    @reports_user_errors
    def execute(self, context):
        scene, job = chosen_job(context, self.job_id)
        jobs.cancel(scene, job)
        self.report({"INFO"}, cancel_report(job.job_id, job.status))
        return {"FINISHED"}


class UNDERSTUDY_OT_collect(bpy.types.Operator):
    """Ask the server about this file's unfinished jobs and add the results that are ready"""

    bl_idname = "understudy.collect"
    bl_label = "Collect Results"

    wait: BoolProperty(name="Wait in background mode", default=True, options={"SKIP_SAVE"},
                       description="Background mode only: block until every job has ended")

    @classmethod
    def poll(cls, context):
        # In background mode Collect is a script's wait for every job to end, and every
        # job may have ended already (Cancel ends a job still queued at once): nothing
        # to do there is no error. In the interface the button is greyed instead.
        if not addon.BATCHED:
            return True
        if jobs.any_job(lambda job: job.active or job.status == Status.UNPLACED):
            return True
        cls.poll_message_set("There are no results to collect: no job is running or waiting to "
                             "be placed.")
        return False

    @reports_user_errors
    def execute(self, context):
        ended = {Status.DONE: 0, Status.CANCELLED: 0, Status.FAILED: 0}
        # Results that came back but could not be placed: place them now (no waiting).
        for scene, job in jobs.unplaced_jobs():
            try:
                jobs.collect_again(scene, job)
            except UserError as error:  # recorded on the job; the others go on
                self.report({"WARNING"}, f"{job.job_id}: {error}")
            if job.status == Status.DONE:  # in the interface it may still be being placed
                ended[Status.DONE] += 1
        pending = jobs.active_jobs()
        if pending and not local_backend.prepare(context, then=jobs.follow):
            return {"FINISHED"}  # the backend starts; the timer follows the jobs once it answers
        if addon.BATCHED:
            jobs.follow()
            return {"FINISHED"}
        timeout = addon.preferences(context).job_timeout_s
        for job_id in [job.job_id for _, job in pending]:
            scene, job = jobs.find_job(job_id)
            jobs.catch_up(scene, job, self.wait, timeout)
            if job.status in ended:
                ended[job.status] += 1
            if job.status in (Status.FAILED, Status.UNPLACED):
                self.report({"WARNING"}, f"{job.job_id}: {job.message}")
        self.report({"INFO"}, ", ".join(f"{count} {state}" for state, count in ended.items()))
        return {"FINISHED"}


class UNDERSTUDY_OT_test_connection(bpy.types.Operator):
    """Ask the server for its model, device and protocol version"""

    bl_idname = "understudy.test_connection"
    bl_label = "Test Connection"

    @reports_user_errors
    def execute(self, context):
        prefs = addon.preferences(context)
        if not local_backend.prepare(context, then=lambda: test_connection(addon.preferences())):
            prefs.connection_report = "Starting the backend: loading the model."
            return {"FINISHED"}
        report = test_connection(prefs)
        self.report({"INFO"}, report)
        return {"FINISHED"}


def test_connection(prefs) -> str:
    """Ask the server for its hello; the report (or the error) is kept for the preferences."""
    config = prefs.server_config()
    try:
        client = link.client_for(config)
        report = link.describe_server(link.guarded(client.hello))
    except UserError as error:
        link.forget(config)
        prefs.connection_report = str(error)
        raise
    prefs.connection_report = report
    return report


class UNDERSTUDY_OT_check_memory(bpy.types.Operator):
    """Ask the server how much GPU memory transferring the active strip would take, as set"""

    bl_idname = "understudy.check_memory"
    bl_label = "Check GPU Memory"

    @classmethod
    def poll(cls, context):
        return has_sequencer(context)

    @reports_user_errors
    def execute(self, context):
        settings = compat.sequencer_scene(context).understudy
        if not local_backend.prepare(context):
            settings.memory_report = "The backend is starting; check again once it is ready."
            return {"FINISHED"}
        self.report({"INFO"}, rendering.plan_memory(context))
        return {"FINISHED"}


class UNDERSTUDY_OT_backend_start(bpy.types.Operator):
    """Start the backend on this computer (or use the one that runs already)"""

    bl_idname = "understudy.backend_start"
    bl_label = "Start"

    @reports_user_errors
    def execute(self, context):
        ready = local_backend.prepare(context, start=True)
        self.report({"INFO"}, local_backend.BACKEND.status_text() if ready else
                    "Starting the backend: loading the model.")
        return {"FINISHED"}


class UNDERSTUDY_OT_backend_stop(bpy.types.Operator):
    """Stop the backend this Blender started (one it did not start is left running)"""

    bl_idname = "understudy.backend_stop"
    bl_label = "Stop"

    def execute(self, context):
        backend = local_backend.BACKEND
        owned, address = backend.owned, backend.address
        backend.stop()
        link.close_all()
        self.report({"INFO"}, "Stopped the backend." if owned else
                    f"The backend at {address or 'its address'} was not started by this "
                    f"Blender, so it is left running.")
        return {"FINISHED"}


class UNDERSTUDY_OT_backend_restart(bpy.types.Operator):
    """Stop the backend this Blender started and start it again"""

    bl_idname = "understudy.backend_restart"
    bl_label = "Restart"

    @reports_user_errors
    def execute(self, context):
        backend = local_backend.BACKEND
        if backend.running and not backend.owned:
            raise UserError(f"The backend at {backend.address} was not started by this "
                            f"Blender; restart it where it was started.")
        backend.stop()
        link.close_all()
        local_backend.prepare(context, start=True)
        return {"FINISHED"}


def landing_text(request: TransferRequest) -> str:
    """Where the result of a transfer goes, for its report."""
    if request.final_of is not None:
        return f"the final replaces take {request.final_of.take} in place"
    if request.takes > 1:
        return f"its {request.takes} takes land above the source as one stack"
    return "the result lands above the source"


def active_stack(context):
    """(scene, stack) of the active strip: a take stack or one-take result it is, or is a
    take of; UserError otherwise."""
    scene = compat.sequencer_scene(context)
    holder = stack.stack_of(scene, compat.active_strip(scene)) if scene is not None else None
    if holder is None:
        raise UserError("The active strip is not an Understudy result; click a take stack (or "
                        "a preview) first.")
    return scene, holder


class TakeOperator:
    """Shared by the operators that act on the active take stack."""

    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        scene = compat.sequencer_scene(context)
        if scene is not None and scene.sequence_editor is not None and \
                stack.stack_of(scene, compat.active_strip(scene)) is not None:
            return True
        cls.poll_message_set("Click a take stack (an Understudy result) first.")
        return False


def show_take(operator, context, choose) -> set[str]:
    """Show the take `choose(numbers, visible)` picks in the active stack; nothing else
    changes."""
    _, holder = active_stack(context)
    takes = stack.take_strips(holder)
    number = choose(list(takes), stack.shown_take(holder))
    stack.show_take(holder, number)
    operator.report({"INFO"}, f"Showing take {number} of {len(takes)}: {takes[number].name}.")
    return {"FINISHED"}


class UNDERSTUDY_OT_next_take(TakeOperator, bpy.types.Operator):
    """Show the next take of the active stack (the others are muted)"""

    bl_idname = "understudy.next_take"
    bl_label = "Next Take"

    @reports_user_errors
    def execute(self, context):
        return show_take(self, context, lambda numbers, shown: step_take(numbers, shown, 1))


class UNDERSTUDY_OT_previous_take(TakeOperator, bpy.types.Operator):
    """Show the previous take of the active stack (the others are muted)"""

    bl_idname = "understudy.previous_take"
    bl_label = "Previous Take"

    @reports_user_errors
    def execute(self, context):
        return show_take(self, context, lambda numbers, shown: step_take(numbers, shown, -1))


class UNDERSTUDY_OT_show_take(TakeOperator, bpy.types.Operator):
    """Show this take of the active stack (the others are muted)"""

    bl_idname = "understudy.show_take"
    bl_label = "Show Take"

    take: IntProperty(name="Take", default=1, min=1, options={"SKIP_SAVE"})

    @reports_user_errors
    def execute(self, context):
        def chosen(numbers, _shown):
            if self.take not in numbers:
                raise UserError(f"The stack has no take {self.take}; it holds takes "
                                f"{', '.join(map(str, sorted(numbers)))}.")
            return self.take

        return show_take(self, context, chosen)


class UNDERSTUDY_OT_render_final(TakeOperator, bpy.types.Operator):
    """Render the shown preview take again at final quality (its prompt, seed and
    settings); the final replaces it in place, as one undo step"""

    bl_idname = "understudy.render_final"
    bl_label = "Render Final"
    bl_options = {"REGISTER"}  # the replacement, when the final arrives, is its own undo step

    wait: BoolProperty(name="Wait in background mode", default=True, options={"SKIP_SAVE"})

    @reports_user_errors
    def execute(self, context):
        scene, holder = active_stack(context)
        request = TransferRequest(final_of=final_of_shown(scene, holder))
        return run_transfer(self, context, request, self.wait)


def final_of_shown(scene, holder) -> rendering.FinalOf:
    """What Render Final renders for the take a stack shows; UserError when there is
    none, it is a final already, or its final is on the way."""
    job_id = holder[JOB_PROPERTY]
    _, job = jobs.find_job(job_id)
    if job is None:
        raise UserError(f"The job {job_id} of this stack is no longer in this file; its takes "
                        f"cannot be rendered again.")
    take = stack.shown_take(holder)
    if take is None:
        raise UserError("No take of the stack is shown; click Next Take, then Render Final.")
    record = jobs.take_record(job, take)
    quality, sidecar_text = (record.quality, record.sidecar) if record is not None else \
        (job.quality, job.sidecar)
    if quality != PREVIEW:
        raise UserError(f"Take {take} is at final quality already.")
    pending = [other.job_id for other in scene.understudy_jobs
               if other.final_of_job == job_id and other.final_of_take == take
               and (other.in_progress or other.status == Status.UNPLACED)]
    if pending:
        raise UserError(f"Take {take}'s final is on its way ({pending[0]}); it replaces the "
                        f"take when it arrives.")
    try:
        sidecar = json.loads(sidecar_text) if sidecar_text else {}
    except ValueError:
        sidecar = {}
    return rendering.FinalOf(job_id, take, job.source_name, job.span(),
                             final_values(sidecar, take), bool(sidecar.get("regions")))


CLASSES = (UNDERSTUDY_OT_transfer, UNDERSTUDY_OT_make_room, UNDERSTUDY_OT_cancel,
           UNDERSTUDY_OT_collect, UNDERSTUDY_OT_test_connection, UNDERSTUDY_OT_check_memory,
           UNDERSTUDY_OT_backend_start, UNDERSTUDY_OT_backend_stop,
           UNDERSTUDY_OT_backend_restart, UNDERSTUDY_OT_next_take, UNDERSTUDY_OT_previous_take,
           UNDERSTUDY_OT_show_take, UNDERSTUDY_OT_render_final)

register, unregister = bpy.utils.register_classes_factory(CLASSES)
