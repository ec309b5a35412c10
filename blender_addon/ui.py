"""The sequencer sidebar tab "Understudy": settings, the button, progress, this file's jobs."""

import bpy

from . import compat, local_backend, plan, props


class UNDERSTUDY_UL_jobs(bpy.types.UIList):
    """One row per job: prompt and status."""

    def draw_item(self, context, layout, data, job, icon, active_data, active_property, index=0):
        row = layout.row(align=True)
        row.label(text=job.prompt or job.job_id, icon="SEQUENCE")
        row.label(text=plan.progress_text(job.status, job.phase, job.percent))


def frames_text(scene) -> str:
    """What is sent: every visible frame of the active strip (the panel has no frame count)."""
    strip = compat.active_strip(scene)
    if strip is None:
        return "Sends every visible frame of the active strip"
    return f"Sends all {strip.frame_final_duration} visible frames of {strip.name!r}"


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

        layout.operator("understudy.transfer", icon="PLAY")
        strip = compat.active_strip(scene)
        if settings.room_strip and strip is not None and strip.name == settings.room_strip:
            box = layout.box()
            box.label(text="No channel for the result under the grade", icon="ERROR")
            box.operator("understudy.make_room", icon="TRIA_UP")
        self.draw_backend(layout, context)
        self.draw_jobs(layout, scene)

    def draw_backend(self, layout, context) -> None:
        """The backend on this computer: starting, ready, busy, stopped or exited (with the
        last log lines and where the whole log is)."""
        if not props.preferences(context).local:
            return
        col = layout.column(align=True)
        for index, line in enumerate(local_backend.status_lines()):
            col.label(text=line, icon="CONSOLE" if index == 0 else "NONE")

    def draw_jobs(self, layout, scene) -> None:
        jobs = scene.understudy_jobs
        running = [job for job in jobs if job.in_progress]
        for job in running:
            row = layout.row(align=True)
            row.progress(factor=job.percent / 100.0, type="BAR",
                         text=plan.progress_text(job.status, job.phase, job.percent))
            if job.cancellable:
                cancel = row.operator("understudy.cancel", text="", icon="CANCEL")
                cancel.job_id = job.job_id
        if not jobs:
            return
        layout.label(text="Jobs in this file")
        layout.template_list("UNDERSTUDY_UL_jobs", "", scene, "understudy_jobs",
                             scene, "understudy_job_index", rows=3)
        if 0 <= scene.understudy_job_index < len(jobs):
            job = jobs[scene.understudy_job_index]
            col = layout.column(align=True)
            col.label(text=f"{job.job_id}: {job.status}")
            if job.seed:
                col.label(text=f"Seed {job.seed}")
            summary = job.sidecar_summary()
            if summary:
                col.label(text=summary)
            if job.message:
                col.label(text=job.message, icon="INFO")
        layout.operator("understudy.collect", icon="FILE_REFRESH")


CLASSES = (UNDERSTUDY_UL_jobs, UNDERSTUDY_PT_panel)

register, unregister = bpy.utils.register_classes_factory(CLASSES)
