"""Understudy for Blender's Video Sequence Editor: select a strip, type a prompt, get a new strip.

Blender imports this package and calls `register()`. The Blender-facing modules are
imported there, not at the top, so the plain-Python ones (rules/, connection/process.py,
...) can be imported and tested without Blender.

The packages, each importing only those below it:

    interface/      operators, panel, preferences and settings: what the editor touches
    job_flow/       jobs.py (the job lists and every state change) and its steps:
                    rendering, following, collecting; file events
    connection/     the client link to a server (link.py) and the backend on this computer
    vse/            the timeline: reading strips, rendering them, placing results
    rules/          plain Python (no bpy): checks, channels, names, the server's replies
    addon.py, vendored.py   this extension's name and preferences; the shared/ package
"""

MODULE_NAMES = ("interface.props", "connection.local", "interface.operators", "job_flow.jobs",
                "job_flow.files", "interface.ui")


def _modules():
    import importlib

    return [importlib.import_module(f"{__package__}.{name}") for name in MODULE_NAMES]


def register() -> None:
    for module in _modules():
        module.register()


def unregister() -> None:
    for module in reversed(_modules()):
        module.unregister()
