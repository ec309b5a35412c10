"""The import graph keeps its rules (tests/import_graph.py states them): first the checker
itself on tiny package trees written for each test, then the project's own tree."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest

from tests.import_graph import (
    Layer,
    Rule,
    build_graph,
    circles,
    forbidden_imports,
)

TOY_LAYERS = (Layer("bottom", ("toy", "toy.base")), Layer("middle", ("toy.core.*",)),
              Layer("top", ("toy.app", "toy.cli")))
TOY_RULES = (Rule(("toy.core.plugins",), ("toy.core.engine",), "plugins never import the engine"),)


def write_tree(root: Path, files: dict[str, str]) -> Path:
    """Write {relative path: source} under root, every folder a package."""
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
        for folder in path.relative_to(root).parents:
            if folder != Path(".") and not (root / folder / "__init__.py").exists():
                (root / folder / "__init__.py").write_text("")
    return root


def toy_graph(root: Path, files: dict[str, str]):
    return build_graph(write_tree(root, files), packages=("toy",))


def toy_problems(graph) -> list[str]:
    return forbidden_imports(graph, TOY_LAYERS, TOY_RULES, layered=("toy",))


CLEAN_TOY = {
    "toy/base.py": "import os\n",
    "toy/core/__init__.py": "from .helpers import thing\n",
    "toy/core/engine.py": "from toy import base\nfrom . import helpers\n",
    "toy/core/helpers.py": "from ..base import *\n",
    "toy/core/plugins.py": "from toy.core.helpers import thing\n",
    "toy/app.py": "import toy.core.engine\nfrom toy.core import plugins\n",
    "toy/cli.py": "",
}


def test_a_clean_tree_has_no_circle_and_no_forbidden_import(tmp_path):
    graph = toy_graph(tmp_path, CLEAN_TOY)
    assert circles(graph) == []
    assert toy_problems(graph) == []
    # Absolute, relative, `from package import submodule` and `from module import name`:
    assert graph.imports_of("toy.core.engine") == ["toy.base", "toy.core.helpers"]
    assert graph.imports_of("toy.core.helpers") == ["toy.base"]
    assert graph.imports_of("toy.core") == ["toy.core.helpers"]  # a package's own relative import
    assert graph.imports_of("toy.core.plugins") == ["toy.core.helpers"]
    assert graph.imports_of("toy.app") == ["toy.core.engine", "toy.core.plugins"]


def test_a_circle_is_found_and_written_as_one_line_of_real_imports(tmp_path):
    graph = toy_graph(tmp_path, {
        **CLEAN_TOY,
        "toy/core/helpers.py": "from . import plugins\n",
        "toy/core/plugins.py": "from .engine import run\n",
        "toy/core/engine.py": "from . import helpers\n",
    })
    assert circles(graph) == ["toy.core.engine -> toy.core.helpers -> toy.core.plugins -> toy.core.engine"]


def test_a_circle_with_branches_is_walked_through_every_module_in_it(tmp_path):
    graph = toy_graph(tmp_path, {  # a imports b and c; each of them imports a back
        "toy/a.py": "from toy import b, c\n", "toy/b.py": "import toy.a\n", "toy/c.py": "import toy.a\n",
    })
    (line,) = circles(graph)
    assert line == "toy.a -> toy.b -> toy.a -> toy.c -> toy.a"
    stops = line.split(" -> ")
    for importer, imported in pairwise(stops):
        assert imported in graph.imports_of(importer)


def test_a_function_local_or_type_checking_import_counts(tmp_path):
    graph = toy_graph(tmp_path, {
        **CLEAN_TOY,
        "toy/base.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from toy.cli import Cli\n",
        "toy/core/helpers.py": "def late():\n    from toy.core import engine\n    return engine\n",
    })
    assert circles(graph) == ["toy.core.engine -> toy.core.helpers -> toy.core.engine"]
    assert toy_problems(graph) == ["toy.base (line 3) imports toy.cli: layer 'bottom' is below layer 'top'"]


def test_a_forbidden_import_and_an_upward_one_are_reported_with_their_line(tmp_path):
    graph = toy_graph(tmp_path, {
        **CLEAN_TOY,
        "toy/core/plugins.py": "import json\n\n\ndef go():\n    from toy.core.engine import run\n",
        "toy/core/helpers.py": "import toy.cli\n",
    })
    assert circles(graph) == []
    assert toy_problems(graph) == [
        "toy.core.helpers (line 1) imports toy.cli: layer 'middle' is below layer 'top'",
        "toy.core.plugins (line 5) imports toy.core.engine: plugins never import the engine",
    ]


def test_a_module_in_no_layer_is_reported(tmp_path):
    graph = toy_graph(tmp_path, {**CLEAN_TOY, "toy/stray.py": ""})
    assert toy_problems(graph) == ["toy.stray is in no layer: place it in tests/import_graph.py's LAYERS"]


def test_the_project_has_no_import_circle_and_no_forbidden_import():
    graph = build_graph()
    assert len(graph.modules) > 50  # the real tree, found from this file
    found = circles(graph) + forbidden_imports(graph)
    if found:
        pytest.fail("\n".join(["Import circles and forbidden imports (the rules: tests/import_graph.py):",
                               *found]), pytrace=False)
