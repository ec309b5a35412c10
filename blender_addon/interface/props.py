"""Blender data: the add-on preferences, the panel's settings, the job records.

Settings and job records live on the scene, so they are saved in the .blend: reopening
a file shows its jobs and collects the results that finished meanwhile.
(No `from __future__ import annotations` here: Blender reads these annotations.)
"""

import bpy
from bpy.props import (
    BoolProperty,
    CollectionProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

from .. import addon
from ..connection import link
from ..connection import local as local_backend
from ..job_flow import jobs
from ..rules.channels import Span
from ..rules.frames import DEFAULT_MAX_RENDER_SIZE
from ..rules.look import LOOK_KINDS, LOOK_NONE
from ..rules.messages import region_summary, sidecar_summary
from ..rules.panel_settings import (
    PANEL_CHOICE_SETTINGS,
    PANEL_INT_SETTINGS,
    SETTINGS,
    choice_property,
    int_property_range,
    setting_from_panel,
)
from ..rules.regions import REGION_KINDS, REGION_NONE
from ..rules.states import ACTIVE, PROTOCOL, Status


def _check_project(self, _context) -> None:
    local_backend.check_entered(self)


def _remember_keep_running(self, _context) -> None:
    local_backend.remember(self)


class UnderstudyPreferences(bpy.types.AddonPreferences):
    bl_idname = addon.ADDON_ID

    backend_kind: EnumProperty(
        name="Backend", default="LOCAL",
        items=[("LOCAL", "This computer", "The extension starts, watches and stops the "
                                          "backend of a project installed here"),
               ("SERVER", "A server", "A backend someone runs (python -m backend serve), here "
                                      "or on a GPU machine")],
        description="Where transfers run")
    project_path: StringProperty(
        name="Project folder", subtype="DIR_PATH", default="", update=_check_project,
        description="The folder the Understudy project is in (where `python build.py` was "
                    "run), or its .venv Python")
    project_report: StringProperty(name="Project check", default="")
    local_model: StringProperty(
        name="Model", default="",
        description="Hub id, local diffusers folder, or tiny (empty: the command line's default)")
    local_device: StringProperty(
        name="Device", default="",
        description="cuda, cuda:1, cpu (empty: the command line's default, CUDA if present)")
    local_state_dir: StringProperty(
        name="State folder", subtype="DIR_PATH", default="",
        description="The job store, the backend's log and lock (empty: the command line's "
                    "default)")
    local_cache_dir: StringProperty(
        name="Cache folder", subtype="DIR_PATH", default="",
        description="Where inversions are cached (empty: the command line's default)")
    local_extra_args: StringProperty(
        name="More serve flags", default="",
        description="Further `python -m backend serve` flags, as on a command line")
    vae_slice: IntProperty(name="VAE slice", **int_property_range("vae_slice"),
                           description=SETTINGS.spec_of("vae_slice").help)
    gradient_checkpointing: BoolProperty(
        name="Gradient checkpointing",
        default=SETTINGS.DEFAULTS["gradient_checkpointing"],
        description=SETTINGS.spec_of("gradient_checkpointing").help)
    start_when_needed: BoolProperty(
        name="Start when needed", default=True,
        description="Transfer, Test Connection and Collect Results start the backend when "
                    "nothing answers")
    keep_running: BoolProperty(
        name="Keep running", default=False, update=_remember_keep_running,
        description="Leave the backend this Blender started running when Blender quits or "
                    "the extension is disabled")

    server_address: StringProperty(
        name="Address", default="tcp://127.0.0.1:5555",
        description="Where the Understudy backend listens (python -m backend serve; on this "
                    "computer, a loopback address)")
    server_key_file: StringProperty(
        name="Server public key file", subtype="FILE_PATH", default="",
        description="The server's CURVE public key (.key); only for a remote server")
    client_key_file: StringProperty(
        name="Client secret key file", subtype="FILE_PATH", default="",
        description="This client's CURVE key pair (.key_secret); only for a remote server")
    timeout_s: FloatProperty(
        name="Reply timeout (s)", default=10.0, min=0.5, max=600.0,
        description="How long to wait for the server to answer one request")
    job_timeout_s: FloatProperty(
        name="Job timeout (s)", default=0.0, min=0.0,
        description="Background mode only: give up waiting for a result after this long "
                    "(0 waits as long as the job runs)")
    max_render_size: IntProperty(
        name="Render size limit (px)", default=DEFAULT_MAX_RENDER_SIZE, min=64, max=4096,
        description="Long side of the frames sent to the server")
    connection_report: StringProperty(name="Last connection test", default="")

    @property
    def local(self) -> bool:
        """The backend runs on this computer, started by the extension when needed."""
        return self.backend_kind == "LOCAL"

    def server_config(self) -> link.ServerConfig:
        if self.local:  # loopback: no keys
            return link.ServerConfig(address=self.server_address, timeout_s=float(self.timeout_s))
        return link.ServerConfig(
            address=self.server_address,
            server_key_file=bpy.path.abspath(self.server_key_file) if self.server_key_file else "",
            client_key_file=bpy.path.abspath(self.client_key_file) if self.client_key_file else "",
            timeout_s=float(self.timeout_s))

    def memory_settings(self) -> dict:
        """The job settings that bound GPU memory (shared/settings.py's names)."""
        return {"vae_slice": int(self.vae_slice),
                "gradient_checkpointing": bool(self.gradient_checkpointing)}

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "backend_kind", expand=True)
        layout.prop(self, "server_address")
        if self.local:
            self.draw_local(layout)
        else:
            layout.prop(self, "server_key_file")
            layout.prop(self, "client_key_file")
        row = layout.row()
        row.prop(self, "timeout_s")
        row.prop(self, "job_timeout_s")
        layout.prop(self, "max_render_size")
        row = layout.row()
        row.operator("understudy.test_connection", icon="PLUGIN")
        if self.connection_report:
            row.label(text=self.connection_report)

    def draw_local(self, layout) -> None:
        """The backend on this computer: its project, settings, buttons and state."""
        layout.prop(self, "project_path")
        if self.project_report:
            layout.label(text=self.project_report,
                         icon="CHECKMARK" if self.project_report.startswith("Backend found")
                         else "ERROR")
        defaults = local_backend.install_defaults(self)
        box = layout.box()
        for name, default_key in (("local_model", "model"), ("local_device", ""),
                                  ("local_state_dir", "state_dir"),
                                  ("local_cache_dir", "cache_dir")):
            box.prop(self, name)
            if not getattr(self, name) and defaults.get(default_key):
                box.label(text=f"empty: {defaults[default_key]}")
        box.prop(self, "local_extra_args")
        row = box.row()
        row.prop(self, "vae_slice")
        row.prop(self, "gradient_checkpointing")
        row = layout.row()
        row.prop(self, "start_when_needed")
        row.prop(self, "keep_running")
        row = layout.row(align=True)
        row.operator("understudy.backend_start", icon="PLAY")
        row.operator("understudy.backend_stop", icon="PAUSE")
        row.operator("understudy.backend_restart", icon="FILE_REFRESH")
        for line in local_backend.status_lines(bool(jobs.active_jobs())):
            layout.label(text=line)


class UnderstudySettings(bpy.types.PropertyGroup):
    """What the panel edits; one set per scene."""

    prompt: StringProperty(name="Prompt", default="",
                           description="What the subject should become")
    source_prompt: StringProperty(name="Source prompt", default="",
                                  description="Optional: what the clip shows now")
    use_random_seed: BoolProperty(name="Random seed", default=True,
                                  description="Pick a new seed for every run")
    seed: IntProperty(name="Seed", default=0, min=0)
    last_seed: StringProperty(name="Last seed", default="",
                              description="The seed of the last finished run")
    show_advanced: BoolProperty(name="Advanced", default=False)
    memory_report: StringProperty(
        name="GPU memory", default="",
        description="The server's memory plan of the last Check GPU Memory: the predicted "
                    "peak against its GPU")
    room_strip: StringProperty(
        name="Needs room", default="",
        description="The strip whose transfer was refused for want of a channel under its "
                    "grade (the panel offers Make Room)")
    steps: IntProperty(name="Steps", **int_property_range("steps"))
    guided_steps: IntProperty(name="Guided steps", **int_property_range("guided_steps"),
                              description="0: the reference's first 40% of the steps")
    guidance_iterations: IntProperty(
        name="Iterations", **int_property_range("guidance_iterations"),
        description="Optimisation iterations per guided step")
    inversion_steps: IntProperty(name="Inversion steps",
                                 **int_property_range("inversion_steps"))
    framing: EnumProperty(name="Framing", **choice_property("framing"))
    width: IntProperty(name="Model width", **int_property_range("width"),
                       description="0: the server's model's own width (Test Connection shows it)")
    height: IntProperty(name="Model height", **int_property_range("height"),
                        description="0: the server's model's own height (Test Connection shows it)")
    negative_prompt: StringProperty(name="Negative prompt", default="",
                                    description="Empty: the model's own negative prompt")
    # Keep the plate: the subject changes inside the region, the rest stays the source's.
    region_kind: EnumProperty(name="Region", items=REGION_KINDS, default=REGION_NONE,
                              description="Where the subject is: only there does the picture "
                                          "change")
    region_mask: PointerProperty(name="Mask", type=bpy.types.Mask,
                                 description="The Mask that outlines the subject (white = subject)")
    region_strip: StringProperty(name="Matte strip", default="",
                                 description="The strip that shows the subject in white")
    region_grow: IntProperty(name="Grow (px)", **int_property_range("region_grow"),
                             description=SETTINGS.spec_of("region_grow").help)
    region_feather: IntProperty(name="Feather (px)", **int_property_range("region_feather"),
                                description=SETTINGS.spec_of("region_feather").help)
    motion: EnumProperty(name="Motion", **choice_property("motion"))
    # The new subject's look from a picture: one reference image, sent with the job to a
    # server whose model takes references (Wan VACE).
    look_kind: EnumProperty(name="Look", items=LOOK_KINDS, default=LOOK_NONE,
                            description="A picture of the new subject's look (a server with "
                                        "Wan VACE takes it)")
    look_image: PointerProperty(name="Image", type=bpy.types.Image,
                                description="The Image that shows the new subject's look")
    look_strip: StringProperty(name="Image strip", default="",
                               description="The image strip whose picture at the current "
                                           "frame shows the new subject's look")
    look_file: StringProperty(name="File", default="", subtype="FILE_PATH",
                              description="A picture file (PNG, JPEG) of the new subject's look")
    reference_strength: FloatProperty(
        name="Look strength", default=SETTINGS.DEFAULTS["reference_strength"],
        min=SETTINGS.spec_of("reference_strength").low,
        max=SETTINGS.spec_of("reference_strength").high,
        description=SETTINGS.spec_of("reference_strength").help)
    # Takes: one result per seed (seed, seed + 1, ...) from one inversion; the server says
    # how many it makes per job (its max_takes), checked before anything is rendered.
    takes: IntProperty(name="Takes", default=1, min=1, max=PROTOCOL.MAX_TAKES,
                       description="How many takes Preview and Transfer make, each with the "
                                   "next seed; they land as one stack, the first shown")

    def values(self, prompt: str = "") -> dict:
        """The settings to send, as plain values (prompt from the operator if given)."""
        return {
            "prompt": prompt or self.prompt,
            "source_prompt": self.source_prompt,
            "negative_prompt": self.negative_prompt,
            "seed": None if self.use_random_seed else int(self.seed),
            **{name: setting_from_panel(name, int(getattr(self, name)))
               for name in PANEL_INT_SETTINGS},
            **{name: str(getattr(self, name)) for name in PANEL_CHOICE_SETTINGS},
            # Only with a Look: a server older than references knows no such setting.
            **({"reference_strength": float(self.reference_strength)}
               if self.look_kind != LOOK_NONE else {}),
        }


class UnderstudyTake(bpy.types.PropertyGroup):
    """One take of a job that made several (or the one of a preview), once it is placed."""

    number: IntProperty(name="Take", default=1, min=1)
    prompt: StringProperty(name="Prompt")
    seed: StringProperty(name="Seed", default="")
    quality: StringProperty(name="Quality", default="final",
                            description="preview, or final once Render Final replaced it")
    sidecar: StringProperty(name="Sidecar", default="",
                            description="The server's record of how the take was made (JSON)")
    final_job: StringProperty(name="Final job", default="",
                              description="The Render Final job whose frames replaced it")


class UnderstudyJob(bpy.types.PropertyGroup):
    """One submitted job, saved with the .blend."""

    job_id: StringProperty(name="Job")
    prompt: StringProperty(name="Prompt")
    status: StringProperty(name="Status", default=Status.SUBMITTED,
                           description=", ".join(Status))
    phase: StringProperty(name="Phase", default="")
    percent: FloatProperty(name="Progress", default=0.0, min=0.0, max=100.0, subtype="PERCENTAGE")
    message: StringProperty(name="Message", default="")
    seed: StringProperty(name="Seed", default="")
    server_address: StringProperty(name="Server")
    source_name: StringProperty(name="Source strip")
    channel: IntProperty(name="Source channel")
    frame_start: IntProperty(name="Start frame")
    length: IntProperty(name="Length")
    result_strip: StringProperty(name="Result strip", default="")
    frames_dir: StringProperty(name="Frames folder", default="")
    placement: StringProperty(name="Placement", default="",
                              description="How the source sat in the edit (placement.py, JSON)")
    sidecar: StringProperty(name="Sidecar", default="",
                            description="The server's record of how the result was made (JSON)")
    quality: StringProperty(name="Quality", default="final", description="preview or final")
    takes: IntProperty(name="Takes", default=1, min=1,
                       description="How many takes the job makes (more than one: a stack)")
    take_records: CollectionProperty(type=UnderstudyTake, name="Placed takes")
    final_of_job: StringProperty(
        name="Final of", default="",
        description="Render Final: the job whose take this job's result replaces")
    final_of_take: IntProperty(name="Final of take", default=0)

    @property
    def active(self) -> bool:
        """The server has the job and has not finished it."""
        return self.status in ACTIVE

    @property
    def cancellable(self) -> bool:
        """Rendering here or running on the server: Cancel can stop it."""
        return self.active or self.status == Status.RENDERING

    @property
    def in_progress(self) -> bool:
        """Rendering, running or being placed: the panel shows a bar."""
        return self.cancellable or self.status == Status.PLACING

    def sidecar_summary(self) -> str:
        import json

        try:
            sidecar = json.loads(self.sidecar) if self.sidecar else {}
        except ValueError:
            return ""
        return sidecar_summary(sidecar) if isinstance(sidecar, dict) else ""

    def region_summary(self) -> str:
        import json

        try:
            sidecar = json.loads(self.sidecar) if self.sidecar else {}
        except ValueError:
            return ""
        return region_summary(sidecar)

    def span(self) -> Span:
        return Span(self.channel, self.frame_start, self.frame_start + self.length)


CLASSES = (UnderstudyPreferences, UnderstudySettings, UnderstudyTake, UnderstudyJob)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.understudy = PointerProperty(type=UnderstudySettings)
    bpy.types.Scene.understudy_jobs = CollectionProperty(type=UnderstudyJob)
    bpy.types.Scene.understudy_job_index = IntProperty(default=0)


def unregister() -> None:
    del bpy.types.Scene.understudy_job_index
    del bpy.types.Scene.understudy_jobs
    del bpy.types.Scene.understudy
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
