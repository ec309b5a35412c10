"""Understudy for Blender's Video Sequence Editor: select a strip, type a prompt, get a new strip.

Blender imports this package and calls `register()`. The Blender-facing modules are
imported there, not at the top, so the plain-Python modules (plan, link) can be
imported and tested without Blender.
"""

MODULE_NAMES = ("props", "local_backend", "operators", "jobs", "files", "ui")


def _modules():
    import importlib

    return [importlib.import_module(f"{__package__}.{name}") for name in MODULE_NAMES]


def register() -> None:
    for module in _modules():
        module.register()


def unregister() -> None:
    for module in reversed(_modules()):
        module.unregister()
