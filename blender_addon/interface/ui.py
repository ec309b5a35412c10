"""The sequencer sidebar tab "Understudy": settings, the button, progress, this file's jobs."""

import bpy

from .. import addon
from ..connection import link
from ..connection import local as local_backend
from ..job_flow import jobs
from ..rules.look import LOOK_FILE, LOOK_IMAGE, LOOK_NONE, LOOK_STRIP, look_refusal, look_text
from ..rules.messages import progress_text
from ..rules.regions import REGION_MASK, REGION_NONE, REGION_STRIP
from ..rules.server_hello import server_max_takes
from ..rules.takes import FINAL, PREVIEW
from ..vse import compat, stack
from . import contact_sheet


class UNDERSTUDY_UL_jobs(bpy.types.UIList):
    """One row per job: prompt and status."""

    def draw_item(self, context, layout, data, job, icon, active_data, active_property, index=0):
        row = layout.row(align=True)
        row.label(text=job.prompt or job.job_id, icon="SEQUENCE")
        row.label(text=progress_text(job.status, job.phase, job.percent))


def frames_text(scene) -> str:
    """What is sent: every visible frame of the active strip (the panel has no frame count)."""
    strip = compat.active_strip(scene)
    if strip is None:
        return "Sends every visible frame of the active strip"
    return f"Sends all {strip.frame_final_duration} visible frames of {strip.name!r}"


def region_text(settings) -> str:
    """What the region is, by name: where the picture changes."""
    if settings.region_kind == REGION_MASK and settings.region_mask is not None:
        return f"Changes only inside the mask {settings.region_mask.name!r}"
    if settings.region_kind == REGION_STRIP and settings.region_strip:
        return f"Changes only inside the matte {settings.region_strip!r}"
    if settings.region_kind != REGION_NONE:
        return "Pick the region that outlines the subject"
    return "Changes the whole frame"


class UNDERSTUDY_PT_panel(bpy.types.Panel):
    bl_label = "Understudy"
    bl_idname = "UNDERSTUDY_PT_panel"
    bl_space_type = "SEQUENCE_EDITOR"
    bl_region_type = "UI"
    bl_category = "Understudy"

    @classmethod
    def poll(cls, context):
        return compat.sequencer_scene(context) is not None

    def draw(self, context):
        layout = self.layout
        scene = compat.sequencer_scene(context)
        settings = scene.understudy
        layout.prop(settings, "prompt")
        layout.prop(settings, "source_prompt")
        row = layout.row(align=True)
        row.prop(settings, "use_random_seed")
        sub = row.row()
        sub.enabled = not settings.use_random_seed
        sub.prop(settings, "seed")
        if settings.last_seed:
            layout.label(text=f"Last seed: {settings.last_seed}")
        layout.prop(settings, "framing")
        self.draw_region(layout, scene, settings)
        self.draw_look(layout, context, scene, settings)

        layout.prop(settings, "show_advanced", icon="PREFERENCES")
        if settings.show_advanced:
            box = layout.box()
            for name in ("steps", "guided_steps", "guidance_iterations", "inversion_steps",
                         "width", "height", "negative_prompt"):
                box.prop(settings, name)
        layout.label(text=frames_text(scene), icon="SEQUENCE")
        row = layout.row(align=True)  # the predicted peak against the server's GPU
        row.label(text=settings.memory_report or "GPU memory: not checked yet", icon="MEMORY")
        row.operator("understudy.check_memory", text="", icon="FILE_REFRESH")

        self.draw_takes_count(layout, context, settings)
        row = layout.row(align=True)  # a cheap look first, or the edit as set
        row.operator("understudy.transfer", text="Preview", icon="HIDE_OFF").quality = PREVIEW
        row.operator("understudy.transfer", icon="PLAY").quality = FINAL
        strip = compat.active_strip(scene)
        if settings.room_strip and strip is not None and strip.name == settings.room_strip:
            box = layout.box()
            box.label(text="No channel for the result under the grade", icon="ERROR")
            box.operator("understudy.make_room", icon="TRIA_UP")
        holder = stack.stack_of(scene, strip) if scene.sequence_editor is not None else None
        if holder is not None:
            self.draw_stack(layout, scene, holder)
        self.draw_backend(layout, context)
        self.draw_jobs(layout, scene)

    def draw_takes_count(self, layout, context, settings) -> None:
        """The Takes field, unless the server this panel talks to said it makes one take
        per job (then one sentence instead)."""
        hello = link.known_hello(addon.preferences(context).server_config())
        if hello is not None and server_max_takes(hello) is None:
            layout.label(text="One take per job: the server is older than this extension",
                         icon="INFO")
            return
        layout.prop(settings, "takes")

    def draw_stack(self, layout, scene, holder) -> None:
        """The active take stack: which take shows, Previous / Next, Render Final, and the
        contact sheet (each take's middle frame and name; a click shows that take)."""
        takes = stack.take_strips(holder)
        shown = stack.shown_take(holder)
        box = layout.box()
        box.label(text=f"{holder.name}: take {shown or '-'} of {len(takes)}", icon="IMAGE")
        row = box.row(align=True)
        row.operator("understudy.previous_take", text="", icon="TRIA_LEFT")
        row.operator("understudy.next_take", text="", icon="TRIA_RIGHT")
        row.operator("understudy.render_final", icon="RENDER_STILL")
        grid = box.grid_flow(columns=min(len(takes), 4), even_columns=True, align=True)
        for number, strip in sorted(takes.items()):
            cell = grid.column(align=True)
            icon = contact_sheet.icon(strip)
            if icon:
                cell.template_icon(icon_value=icon, scale=4.0)
            button = cell.operator("understudy.show_take", text=strip.name,
                                   depress=number == shown)
            button.take = number

    def draw_region(self, layout, scene, settings) -> None:
        """Keep the plate: the region (a Mask or a matte strip), its name, grow, feather
        and motion (their ranges and help from shared/settings.py)."""
        box = layout.box()
        box.prop(settings, "region_kind")
        if settings.region_kind == REGION_MASK:
            box.prop(settings, "region_mask")
        elif settings.region_kind == REGION_STRIP and scene.sequence_editor is not None:
            box.prop_search(settings, "region_strip", scene.sequence_editor,
                            "strips" if hasattr(scene.sequence_editor, "strips") else "sequences")
        box.label(text=region_text(settings), icon="MOD_MASK")
        row = box.row(align=True)
        row.prop(settings, "region_grow")
        row.prop(settings, "region_feather")
        box.prop(settings, "motion")

    def draw_look(self, layout, context, scene, settings) -> None:
        """The new subject's look: an Image (with its thumbnail), an image strip at the
        current frame, or a file; the one sentence when the server (as it last said
        hello) takes no reference."""
        box = layout.box()
        box.prop(settings, "look_kind")
        name = ""
        if settings.look_kind == LOOK_IMAGE:
            box.template_ID_preview(settings, "look_image", open="image.open", rows=2, cols=4)
            name = settings.look_image.name if settings.look_image is not None else ""
        elif settings.look_kind == LOOK_STRIP and scene.sequence_editor is not None:
            box.prop_search(settings, "look_strip", scene.sequence_editor,
                            "strips" if hasattr(scene.sequence_editor, "strips") else "sequences")
            name = settings.look_strip
        elif settings.look_kind == LOOK_FILE:
            box.prop(settings, "look_file")
            name = settings.look_file
        box.label(text=look_text(settings.look_kind, name), icon="IMAGE_DATA")
        if settings.look_kind != LOOK_NONE:
            box.prop(settings, "reference_strength")
            hello = link.known_hello(addon.preferences(context).server_config())
            refusal = None if hello is None else look_refusal(hello, True)
            if refusal is not None:
                box.label(text=refusal, icon="ERROR")

    def draw_backend(self, layout, context) -> None:
        """The backend on this computer: starting, ready, busy, stopped or exited (with the
        last log lines and where the whole log is)."""
        if not addon.preferences(context).local:
            return
        col = layout.column(align=True)
        for index, line in enumerate(local_backend.status_lines(bool(jobs.active_jobs()))):
            col.label(text=line, icon="CONSOLE" if index == 0 else "NONE")

    def draw_jobs(self, layout, scene) -> None:
        records = scene.understudy_jobs
        running = [job for job in records if job.in_progress]
        for job in running:
            row = layout.row(align=True)
            row.progress(factor=job.percent / 100.0, type="BAR",
                         text=progress_text(job.status, job.phase, job.percent))
            if job.cancellable:
                cancel = row.operator("understudy.cancel", text="", icon="CANCEL")
                cancel.job_id = job.job_id
        if not records:
            return
        layout.label(text="Jobs in this file")
        layout.template_list("UNDERSTUDY_UL_jobs", "", scene, "understudy_jobs",
                             scene, "understudy_job_index", rows=3)
        if 0 <= scene.understudy_job_index < len(records):
            job = records[scene.understudy_job_index]
            col = layout.column(align=True)
            col.label(text=f"{job.job_id}: {job.status}")
            if job.seed:
                col.label(text=f"Seed {job.seed}")
            summary = job.sidecar_summary()
            if summary:
                col.label(text=summary)
            region = job.region_summary()
            if region:
                col.label(text=region)
            if job.message:
                col.label(text=job.message, icon="INFO")
        layout.operator("understudy.collect", icon="FILE_REFRESH")


CLASSES = (UNDERSTUDY_UL_jobs, UNDERSTUDY_PT_panel)

_register_classes, _unregister_classes = bpy.utils.register_classes_factory(CLASSES)


def register() -> None:
    _register_classes()


def unregister() -> None:
    _unregister_classes()
    contact_sheet.clear()
