"""The project's `shared/` package, from inside the extension or from a checkout.

The built extension carries a copy of `shared/` inside (`<extension>/shared/`); a
development checkout imports the project's own.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


def shared_module(name: str) -> ModuleType:
    """`shared.<name>`: the vendored copy if the extension has one, else the checkout's."""
    vendored = f"{__package__}.shared"
    if importlib.util.find_spec(vendored) is not None:
        return importlib.import_module(f"{vendored}.{name}")
    return importlib.import_module(f"shared.{name}")
