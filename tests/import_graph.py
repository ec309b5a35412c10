"""The project's import graph, its circles, and the layer rules it must keep.

The rules (docs link here; tests/test_import_graph.py holds the project to them):

1. No import circle anywhere in backend/, shared/ or blender_addon/.
2. The backend and shared/ are layered, bottom first (`LAYERS`). A module may import
   from its own layer or from the layers below it, never from a layer above:

   1. shared            protocol, settings, errors, sidecar, client
   2. base              backend.errors, backend.video, backend.results, backend.masks,
                        backend.references (and the bare
                        `backend` package)
   3. backbones         backend.backbones.*: the model seam, the registry, loading
   4. memory            backend.memory.*: planner, savers, CPU terms, the counter
   5. method            backend.method.*: the paper's method, free of any one model
   6. edit              backend.edit: one edit, from loading to the result
   7. serving           backend.server.*, backend.cluster.*
   8. entry points      backend.cli, backend.__main__, backend.tools.*

   Every backend and shared module must sit in one layer, so a new module is placed on
   purpose rather than by accident.
3. Explicit rules (`RULES`), over and above the layers: no module under
   backend.backbones, backend.server, backend.cluster or backend.memory imports
   backend.method (serving goes through backend.edit); shared imports nothing from
   backend or blender_addon; blender_addon imports neither backend nor shared by name
   (it reaches shared/ only through its vendored copy, blender_addon/vendored.py).

What counts as an import: every `import` and `from ... import` statement in a module,
wherever it stands: at module level, inside a function, under `if TYPE_CHECKING:`, in a
`try`. Relative imports are resolved against the module's package. `from pkg import name`
is an import of the submodule `pkg.name` when that is a module, else of `pkg` itself.
Importing `a.b.c` also runs the packages `a` and `a.b`; those implicit edges are not
counted (Python finishes a package's __init__ before its submodules need it, and
import-linter does the same). `importlib.import_module(...)` calls are not imports here.

Run `python -m tests.import_graph` for the current circles and forbidden imports.
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_PACKAGES = ("backend", "shared", "blender_addon")
REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Layer:
    name: str
    modules: tuple[str, ...]  # "a.b": that module only; "a.b.*": a.b and everything under it


LAYERS: tuple[Layer, ...] = (  # bottom first
    Layer("shared", ("shared.*",)),
    Layer("base", ("backend", "backend.errors", "backend.video", "backend.results", "backend.masks",
                   "backend.references", "backend.gang")),
    Layer("backbones", ("backend.backbones.*",)),
    Layer("memory", ("backend.memory.*",)),
    Layer("method", ("backend.method.*",)),
    Layer("edit", ("backend.edit",)),
    Layer("serving", ("backend.server.*", "backend.cluster.*")),
    Layer("entry points", ("backend.cli", "backend.__main__", "backend.tools.*")),
)
"""Every module under LAYERED_PACKAGES must sit in a layer."""
LAYERED_PACKAGES = ("backend", "shared")


@dataclass(frozen=True)
class Rule:
    importers: tuple[str, ...]  # modules (and everything under them) the rule binds
    forbidden: tuple[str, ...]  # modules (and everything under them) they may not import
    why: str


RULES: tuple[Rule, ...] = (
    Rule(("backend.backbones", "backend.server", "backend.cluster", "backend.memory"),
         ("backend.method",),
         "backbones, serving and memory never import the method (serving goes through backend.edit)"),
    Rule(("shared",), ("backend", "blender_addon"), "shared/ is the bottom: it imports no project package"),
    Rule(("blender_addon",), ("backend", "shared"),
         "the extension never imports the backend, and reaches shared/ only through its vendored copy"),
)


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int


@dataclass
class ImportGraph:
    """Project modules and the imports between them (each edge with its line numbers)."""

    modules: dict[str, Path]  # module name -> its file
    lines: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # (a, b) -> lines of a

    def imports_of(self, module: str) -> list[str]:
        return sorted(b for (a, b) in self.lines if a == module)

    def imports(self) -> list[Import]:
        return [Import(a, b, line) for (a, b), lines in sorted(self.lines.items()) for line in lines]


def covers(prefix: str, module: str) -> bool:
    """`prefix` is `module` or one of the packages above it."""
    return module == prefix or module.startswith(prefix + ".")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def find_modules(root: Path, packages: tuple[str, ...] = PROJECT_PACKAGES) -> dict[str, Path]:
    """Every module of `packages` under `root` (a folder holding them), by dotted name."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                modules[module_name(root, path)] = path
    return modules


def imported_modules(module: str, is_package: bool, node: ast.Import | ast.ImportFrom,
                     modules: dict[str, Path]) -> list[str]:
    """The project modules one import statement in `module` names (none for outside ones)."""

    def known(name: str) -> str | None:  # the module itself, else the nearest package above it
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    if isinstance(node, ast.Import):
        found = [known(alias.name) for alias in node.names]
        return [name for name in found if name]
    if node.level:
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    found = []
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        found.append(submodule if submodule in modules else known(base))
    return [name for name in found if name]


def build_graph(root: Path = REPOSITORY_ROOT, packages: tuple[str, ...] = PROJECT_PACKAGES) -> ImportGraph:
    """Parse every module of `packages` under `root` and collect every import statement."""
    graph = ImportGraph(find_modules(root, packages))
    for module, path in graph.modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for imported in imported_modules(module, path.name == "__init__.py", node, graph.modules):
                    if imported != module:  # `from . import NAME` of a package's own name
                        lines = graph.lines.setdefault((module, imported), [])
                        if node.lineno not in lines:  # `from m import a, b`: one import of m
                            lines.append(node.lineno)
    for lines in graph.lines.values():
        lines.sort()
    return graph


def strongly_connected(graph: ImportGraph) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module, each sorted, in
    name order."""
    successors = {module: graph.imports_of(module) for module in graph.modules}
    index: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(module: str) -> None:
        index[module] = lowest[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for successor in successors[module]:
            if successor not in index:
                visit(successor)
                lowest[module] = min(lowest[module], lowest[successor])
            elif successor in on_stack:
                lowest[module] = min(lowest[module], index[successor])
        if lowest[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    recursion_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(recursion_limit, 4 * len(successors) + 100))
    try:
        for module in sorted(successors):
            if module not in index:
                visit(module)
    finally:
        sys.setrecursionlimit(recursion_limit)
    return sorted(components)


def shortest_path(graph: ImportGraph, start: str, goal: str, within: set[str]) -> list[str]:
    """The fewest imports from `start` to `goal` (both included), through `within` only."""
    came_from: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for successor in graph.imports_of(module):
            if successor in within and (successor not in came_from or successor == goal):
                if successor == goal:
                    path = [goal, module]
                    while came_from[path[-1]] is not None:
                        path.append(came_from[path[-1]])  # type: ignore[arg-type]
                    return path[::-1]
                came_from[successor] = module
                queue.append(successor)
    raise ValueError(f"no path from {start} to {goal}")


def circle_walk(graph: ImportGraph, component: list[str]) -> list[str]:
    """A closed walk of imports through every module of one circle, starting and ending at
    its first module: each next stop is the nearest module not yet passed."""
    members = set(component)
    walk = [component[0]]
    unseen = members - {component[0]}
    while unseen:
        path = min((shortest_path(graph, walk[-1], goal, members) for goal in sorted(unseen)), key=len)
        walk += path[1:]
        unseen -= set(path)
    walk += shortest_path(graph, walk[-1], component[0], members)[1:]
    return walk


def circles(graph: ImportGraph) -> list[str]:
    """Each import circle as one line: `a -> b -> c -> a` (a longer ring passes every
    module in it, revisiting some where the ring has branches)."""
    return [" -> ".join(circle_walk(graph, component)) for component in strongly_connected(graph)]


def layer_of(module: str, layers: tuple[Layer, ...] = LAYERS) -> int | None:
    """The index (0 = bottom) of the layer that holds `module`, None if none does."""
    for position, layer in enumerate(layers):
        for entry in layer.modules:
            if entry == module or (entry.endswith(".*") and covers(entry[:-2], module)):
                return position
    return None


def forbidden_imports(graph: ImportGraph, layers: tuple[Layer, ...] = LAYERS,
                      rules: tuple[Rule, ...] = RULES,
                      layered: tuple[str, ...] = LAYERED_PACKAGES) -> list[str]:
    """Every import that breaks a layer or a rule, and every layered module in no layer,
    one line each."""
    problems = []
    for module in sorted(graph.modules):
        if any(covers(package, module) for package in layered) and layer_of(module, layers) is None:
            problems.append(f"{module} is in no layer: place it in tests/import_graph.py's LAYERS")
    for edge in graph.imports():
        reasons = []
        importer, imported = layer_of(edge.importer, layers), layer_of(edge.imported, layers)
        if importer is not None and imported is not None and imported > importer:
            reasons.append(f"layer '{layers[importer].name}' is below layer '{layers[imported].name}'")
        reasons += [rule.why for rule in rules
                    if any(covers(entry, edge.importer) for entry in rule.importers)
                    and any(covers(entry, edge.imported) for entry in rule.forbidden)]
        if reasons:
            problems.append(f"{edge.importer} (line {edge.line}) imports {edge.imported}: "
                            + "; ".join(reasons))
    return problems


def main() -> int:
    graph = build_graph()
    found_circles, problems = circles(graph), forbidden_imports(graph)
    print(f"{len(graph.modules)} modules, {len(graph.lines)} imports between them")
    print(f"{len(found_circles)} circle(s):", *found_circles, sep="\n  ")
    print(f"{len(problems)} forbidden import(s) or unplaced module(s):", *problems, sep="\n  ")
    return 1 if found_circles or problems else 0


if __name__ == "__main__":
    sys.exit(main())
