#!/usr/bin/env python3
"""Set-up, packaging, tests and demo for Understudy.

    python build.py            build the Blender extension zips (one per platform) into dist/
    python build.py package [--output-dir DIR]   the same, into DIR
    python build.py test [ARGS] set up .venv (and .venv-blender-lts, bpy 4.2 alone) if needed,
                               then run pytest (ARGS go to pytest)
    python build.py demo       run the main job on the bundled example, then the same round
                               trip through headless Blender and the extension
    python build.py env        only create or refresh the environments
    python build.py mutate     mutation-test the pure modules with mutmut (docs/testing.md)
    python build.py lock       re-resolve the newest versions pyproject.toml allows into
                               locks/ (the tested versions every install uses); see README

The virtual environment lives in `.venv` (Python 3.11, the Python of Blender 4.2-5.0).
It is reused while the dependency lists in pyproject.toml and the lock files in locks/ are
unchanged, and refreshed when they change: a stamp file inside .venv records what was
installed.  Every install is constrained by locks/ (`pip install -c`), so a fresh machine
gets the versions the suite passed with, not whatever was released since.

Which torch gets installed is set by UNDERSTUDY_TORCH (default "torch==2.13.0", the
CPU build on machines that carry it locally).  On a CUDA machine choose your own, e.g.

    UNDERSTUDY_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

or UNDERSTUDY_TORCH=none to keep whatever torch the environment already has.

This file uses the standard library only, so it runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BLENDER_LTS_VENV = ROOT / ".venv-blender-lts"
STAMP_NAME = "understudy-stamp.json"
LOCK_DIR = ROOT / "locks"
MAIN_LOCK = LOCK_DIR / "main.txt"
BLENDER_LTS_LOCK = LOCK_DIR / "blender-lts.txt"
# torch and the CUDA libraries it pulls in are chosen by UNDERSTUDY_TORCH (CPU here, a CUDA
# build on a GPU box), so the lock leaves them out rather than pin one build for everyone.
UNLOCKED_PREFIXES = ("torch", "triton", "nvidia-")
REQUIRED_PYTHON = (3, 11)
DEFAULT_TORCH = "torch==2.13.0"
PYTEST_NO_TESTS_COLLECTED = 5


class BuildError(Exception):
    """A failure the user can fix; its message is one sentence saying how."""


# --------------------------------------------------------------------------- environment


def venv_python(venv: Path) -> Path:
    """The interpreter inside a virtual environment, on any OS."""
    if os.name == "nt":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def dependency_spec(pyproject_text: str) -> dict:
    """The parts of pyproject.toml that decide what gets installed.

    Editing tool settings (ruff, pytest) does not change this, so it does not force a
    reinstall; editing `dependencies` or `optional-dependencies` does.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11: fall back to the whole file
        return {"pyproject": pyproject_text}
    project = tomllib.loads(pyproject_text).get("project", {})
    return {
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
    }


def wanted_stamp(pyproject_text: str, torch_spec: str, python_version: tuple[int, int],
                 lock_text: str = "") -> dict:
    """What a correct environment's stamp says: dependencies, lock, torch choice, Python."""
    spec = dependency_spec(pyproject_text)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    return {"dependencies_sha256": digest, "lock_sha256": text_digest(lock_text),
            "torch": torch_spec, "python": list(python_version)}


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def read_lock(path: Path) -> str:
    """A lock file's text; a checkout without it cannot install the tested versions."""
    try:
        return path.read_text()
    except OSError as error:
        raise BuildError(f"The lock file {path} is missing ({error.strerror}); restore it with "
                         f"`git checkout -- locks/{path.name}` or make a new one with "
                         f"`python build.py lock`.") from None


def lock_lines(freeze_output: str) -> list[str]:
    """`pip freeze` output as lock lines: pinned distributions only, torch's family left out,
    local version labels dropped (`x==1.0+cpu` pins `x==1.0`, which a CUDA build also satisfies)."""
    lines = []
    for raw in freeze_output.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "==" not in line or line.startswith("-e "):
            continue
        name, version = line.split("==", 1)
        if name.lower().replace("_", "-").startswith(UNLOCKED_PREFIXES):
            continue
        lines.append(f"{name}=={version.split('+', 1)[0]}")
    return sorted(lines, key=str.lower)


def venv_state(venv: Path, wanted: dict) -> str:
    """'missing' (create it), 'stale' (reinstall into it) or 'fresh' (reuse it as is)."""
    if not venv_python(venv).exists():
        return "missing"
    try:
        recorded = json.loads((venv / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return "stale"
    if recorded.get("python") != wanted["python"]:
        return "missing"
    return "fresh" if recorded == wanted else "stale"


def find_python311() -> str:
    """An interpreter of the required version: this one, or python3.11 on PATH."""
    if sys.version_info[:2] == REQUIRED_PYTHON:
        return sys.executable
    found = shutil.which("python3.11")
    if found:
        return found
    raise BuildError(
        f"Understudy needs Python 3.11 (the Python of Blender 4.2-5.0) but this is "
        f"{sys.version.split()[0]} and no python3.11 is on PATH; install Python 3.11 "
        f"(for example `pyenv install 3.11`) and run `python3.11 build.py test`."
    )


def run_checked(command: list[str], failure: str) -> None:
    print("+", " ".join(shlex.quote(part) for part in command), flush=True)
    if subprocess.call(command) != 0:
        raise BuildError(failure)


INSTALL_FAILED = (
    "Installing the dependencies failed (pip's message is above); check the network "
    "or package index, then run `python build.py test` again."
)


def prepare_environment(venv: Path, wanted: dict, install) -> Path:
    """Create, refresh or reuse a virtual environment whose stamp should be `wanted`.

    `install(pip)` installs into it, given pip's command prefix; the stamp is written
    only after it succeeds, so an interrupted install is redone next time.
    """
    state = venv_state(venv, wanted)
    python = venv_python(venv)
    if state == "fresh":
        print(f"Reusing {venv.name} (dependencies unchanged).", flush=True)
        return python
    if state == "missing":
        base = find_python311()
        print(f"Creating {venv} with {base} ...", flush=True)
        if venv.exists():
            shutil.rmtree(venv)
        run_checked(
            [base, "-m", "venv", str(venv)],
            f"Could not create the virtual environment at {venv}; check that Python 3.11 "
            f"has the venv module (Debian: apt-get install python3.11-venv) and try again.",
        )
    else:
        print(f"Dependencies changed: refreshing {venv} ...", flush=True)
    (venv / STAMP_NAME).unlink(missing_ok=True)
    install([str(python), "-m", "pip", "install", "--disable-pip-version-check"])
    (venv / STAMP_NAME).write_text(json.dumps(wanted, indent=2))
    return python


def ensure_venv(venv: Path = VENV, root: Path = ROOT, locked: bool = True) -> Path:
    """The project's environment: torch first, then the project with its test extras and
    the cluster extra (Ray), so the Ray tests run wherever the suite runs.

    Installs are constrained by locks/main.txt unless `locked` is False (the newest versions
    pyproject.toml allows, which is how `lock` re-resolves)."""
    torch_spec = os.environ.get("UNDERSTUDY_TORCH", DEFAULT_TORCH).strip()
    lock = root / MAIN_LOCK.relative_to(ROOT)
    lock_text = read_lock(lock) if locked else ""
    wanted = wanted_stamp((root / "pyproject.toml").read_text(), torch_spec, REQUIRED_PYTHON,
                          lock_text)
    constraints = ["-c", str(lock)] if locked else []

    def install(pip: list[str]) -> None:
        if torch_spec.lower() != "none":
            run_checked(pip + shlex.split(torch_spec), INSTALL_FAILED)
        run_checked(pip + constraints + ["-e", f"{root}[test,cluster]"], INSTALL_FAILED)

    return prepare_environment(venv, wanted, install)


def ensure_blender_lts_venv(venv: Path = BLENDER_LTS_VENV, root: Path = ROOT,
                            locked: bool = True) -> Path:
    """A second environment holding only Blender 4.2 LTS's bpy wheel (pyproject's
    `blender-lts` extra): bpy 4.2 and 5.0 cannot share one environment.  Constrained by
    locks/blender-lts.txt unless `locked` is False."""
    spec = dependency_spec((root / "pyproject.toml").read_text())
    requirements = spec.get("optional-dependencies", {}).get("blender-lts", [])
    lock = root / BLENDER_LTS_LOCK.relative_to(ROOT)
    lock_text = read_lock(lock) if locked else ""
    wanted = {"requirements": requirements, "lock_sha256": text_digest(lock_text),
              "python": list(REQUIRED_PYTHON)}
    constraints = ["-c", str(lock)] if locked else []
    return prepare_environment(venv, wanted,
                               lambda pip: run_checked(pip + constraints + requirements,
                                                       INSTALL_FAILED))


def freeze(python: Path) -> list[str]:
    """What an environment holds, as lock lines."""
    result = subprocess.run([str(python), "-m", "pip", "freeze", "--exclude-editable",
                             "--disable-pip-version-check"], capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"pip freeze failed in {python} ({result.stderr.strip()[-300:]}); "
                         f"run `python build.py lock` again.")
    return lock_lines(result.stdout)


LOCK_HEADER = (
    "# The versions the test suite passed with; every install is constrained by this file\n"
    "# (pip install -c).  Made by `python build.py lock` (newest versions pyproject.toml\n"
    "# allows); to move forward: run it, then `python build.py test`, and commit locks/ if\n"
    "# the suite passes.  torch is chosen by UNDERSTUDY_TORCH and not listed.\n"
)


def write_lock(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(LOCK_HEADER + "".join(f"{line}\n" for line in lines))


# --------------------------------------------------------------------------- extension package

ADDON_DIR = ROOT / "blender_addon"
SHARED_DIR = ROOT / "shared"
WHEEL_CACHE = ROOT / "build" / "wheels"
WHEEL_INDEX_NAME = "index.json"
MANIFEST_NAME = "blender_manifest.toml"
MANIFEST_WHEELS_LINE = "wheels = []"
BUNDLED_DISTRIBUTION = "pyzmq"
PIP_TIMEOUT_S = 300
# Blender's platform names and the pip platform tags whose cp311 wheels run there.  pip
# picks the newest compatible file; both macOS entries resolve to pyzmq's universal2 wheel.
WHEEL_PLATFORMS = {
    "linux-x64": ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"],
    "windows-x64": ["win_amd64"],
    "macos-arm64": ["macosx_11_0_arm64"],
    "macos-x64": ["macosx_10_15_x86_64"],
}


def helper_output(python: str, code: str) -> str:
    """Run a short Python snippet with the given interpreter and return its stdout."""
    result = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"{python} could not run a build step ({result.stderr.strip()[-300:]}); "
                         f"run `python build.py env` and try again.")
    return result.stdout.strip()


def installed_version(python: str, distribution: str) -> str:
    """The version of a distribution installed for `python` (the venv's pyzmq, say)."""
    return helper_output(
        python, f"import importlib.metadata as m; print(m.version({distribution!r}))")


def blender_extension_cli(python: str) -> Path:
    """Blender's own extension tool (blender_ext.py) inside the bpy wheel, found without importing bpy."""
    bpy_dir = helper_output(
        python, "import importlib.util as u; print(u.find_spec('bpy').submodule_search_locations[0])")
    found = sorted(Path(bpy_dir).glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
    if not found:
        raise BuildError(f"The bpy wheel in {bpy_dir} has no blender_ext.py; reinstall bpy "
                         f"with `python build.py env`.")
    return found[-1]


def cached_wheels(python: str, version: str, cache: Path = WHEEL_CACHE) -> dict[str, Path]:
    """One pyzmq wheel per Blender platform, downloaded from PyPI once and then reused.

    `cache/index.json` remembers which file serves which platform, so a warm cache
    needs no network at all.
    """
    cache.mkdir(parents=True, exist_ok=True)
    index_path = cache / WHEEL_INDEX_NAME
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    wheels = {}
    for platform, pip_tags in WHEEL_PLATFORMS.items():
        key = f"{BUNDLED_DISTRIBUTION}=={version} {platform}"
        known = index.get(key)
        if not (known and (cache / known).is_file()):
            index[key] = download_wheel(python, version, pip_tags, platform, cache)
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
        wheels[platform] = cache / index[key]
    return wheels


def download_wheel(python: str, version: str, pip_tags: list[str], platform: str,
                   cache: Path) -> str:
    """Download one cp311 wheel into `cache` and return its file name."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        command = [python, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
                   "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
                   "--timeout", "20", "--retries", "1", "-d", scratch]
        for tag in pip_tags:
            command += ["--platform", tag]
        command.append(f"{BUNDLED_DISTRIBUTION}=={version}")
        print("+", " ".join(shlex.quote(part) for part in command), flush=True)
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
            failed = result.returncode != 0
        except subprocess.TimeoutExpired:
            failed = True
        downloaded = sorted(Path(scratch).glob("*.whl"))
        if failed or len(downloaded) != 1:
            raise BuildError(
                f"Could not download the {BUNDLED_DISTRIBUTION} {version} wheel for {platform} "
                f"from PyPI; check the network connection (or copy the wheel into {cache}) "
                f"and run `python build.py` again.")
        target = cache / downloaded[0].name
        shutil.move(str(downloaded[0]), target)
        return target.name


def manifest_with_wheels(manifest_text: str, wheel_names: list[str]) -> str:
    """The manifest text with its empty `wheels = []` line listing ./wheels/NAME entries."""
    if MANIFEST_WHEELS_LINE not in manifest_text.splitlines():
        raise BuildError(f"blender_addon/{MANIFEST_NAME} lost its `{MANIFEST_WHEELS_LINE}` "
                         f"line; put it back so the build can list the wheels.")
    listed = ", ".join(json.dumps(f"./wheels/{name}") for name in wheel_names)
    return manifest_text.replace(MANIFEST_WHEELS_LINE, f"wheels = [{listed}]", 1)


def absolute_self_imports(source: Path, package: str = "shared") -> list[str]:
    """Modules of a package that import it by its absolute name.

    Inside the extension the package is `bl_ext.<repo>.understudy.shared`, so only
    relative imports (`from . import protocol`) find it there.
    """
    pattern = re.compile(rf"^\s*(from|import) {package}\b", re.MULTILINE)
    return [module.name for module in sorted(source.glob("*.py"))
            if pattern.search(module.read_text())]


def vendor_package(source: Path, target: Path) -> None:
    """Copy the project's `shared/` package into the extension."""
    absolute = absolute_self_imports(source)
    if absolute:
        raise BuildError(f"{source.name}/{absolute[0]} imports `{source.name}` by its absolute "
                         f"name, which cannot work inside the extension; write "
                         f"`from . import NAME` instead.")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def stage_extension(stage: Path, wheels: list[Path]) -> None:
    """Lay out the extension's source: the add-on, the vendored `shared/` package, the wheels."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    if stage.exists():
        shutil.rmtree(stage)
    shutil.copytree(ADDON_DIR, stage, ignore=ignore)
    vendor_package(SHARED_DIR, stage / "shared")
    (stage / "wheels").mkdir()
    for wheel in wheels:
        shutil.copy2(wheel, stage / "wheels" / wheel.name)
    manifest = stage / MANIFEST_NAME
    names = sorted({wheel.name for wheel in wheels})
    manifest.write_text(manifest_with_wheels(manifest.read_text(), names))


def package_extension(output_dir: Path, python: str, cache: Path = WHEEL_CACHE) -> list[Path]:
    """Build and validate one extension zip per platform in `output_dir`; return their paths."""
    import tempfile

    cli = blender_extension_cli(python)
    version = installed_version(python, BUNDLED_DISTRIBUTION)
    wheels = cached_wheels(python, version, cache)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        stage = Path(scratch) / "understudy"
        stage_extension(stage, list(wheels.values()))
        for old in output_dir.glob("understudy-*.zip"):
            old.unlink()
        run_checked([python, str(cli), "build", "--source-dir", str(stage),
                     "--output-dir", str(output_dir), "--split-platforms"],
                    "Blender's extension build failed (its message is above).")
    zips = sorted(output_dir.glob("understudy-*.zip"))
    if len(zips) != len(WHEEL_PLATFORMS):
        raise BuildError(f"Expected {len(WHEEL_PLATFORMS)} extension zips in {output_dir} but "
                         f"found {len(zips)}; see Blender's build output above.")
    for path in zips:
        run_checked([python, str(cli), "validate", str(path)],
                    f"Blender's extension validation rejected {path.name} (its message is above).")
    return zips


# --------------------------------------------------------------------------- commands


# The whole suite runs in three processes (pytest-xdist): most tests wait on servers,
# Blender and subprocesses rather than compute, so three overlap well on two cores. Tests
# sharing one Ray instance stay in one process (their xdist group, tests/conftest.py).
# The 30 slowest tests are listed at the end, so a CI log shows where the time went.
SUITE_PARALLEL_ARGS = ["-n", "3", "--dist", "loadgroup", "--durations=30"]


def command_test(pytest_args: list[str]) -> int:
    python = ensure_venv()
    blender_lts_python = ensure_blender_lts_venv()
    command = [str(python), "-m", "pytest", *(pytest_args or SUITE_PARALLEL_ARGS)]
    print("+", " ".join(command), flush=True)
    # The Blender 4.2 LTS tests run their bpy scenarios with this interpreter.
    env = {**os.environ, "UNDERSTUDY_BLENDER_LTS_PYTHON": str(blender_lts_python)}
    code = subprocess.call(command, cwd=ROOT, env=env)
    if code == PYTEST_NO_TESTS_COLLECTED:
        print("No tests were collected; that counts as a failure.", file=sys.stderr)
        return 1
    return code


def this_platform() -> str:
    """Blender's name for this machine's platform (which extension zip runs here)."""
    import platform

    machine = platform.machine().lower()
    arch = "arm64" if machine in ("arm64", "aarch64") else "x64"
    system = {"linux": "linux", "win32": "windows", "darwin": "macos"}.get(sys.platform, sys.platform)
    return f"{system}-{arch}"


def command_demo(args: list[str]) -> int:
    """The backend's demo, then the Blender round trip with the built extension."""
    python = ensure_venv()
    code = subprocess.call([str(python), "-m", "backend", "demo", *args], cwd=ROOT)
    if code != 0:
        return code
    zips = package_extension(ROOT / "build" / "demo-dist", python=str(python))
    suffix = this_platform().replace("-", "_") + ".zip"
    matching = [path for path in zips if path.name.endswith(suffix)]
    if not matching:
        raise BuildError(f"The extension has no build for {this_platform()}; the Blender demo "
                         f"needs one of {', '.join(WHEEL_PLATFORMS)}.")
    return subprocess.call([str(python), "-m", "backend.tools.blender_demo", "--zip", str(matching[0]),
                            "--output", str(ROOT / "demo_output")], cwd=ROOT)


def command_package(args: list[str]) -> int:
    """`python build.py [package] [--output-dir DIR]`: the extension zips, one per platform."""
    output_dir = ROOT / "dist"
    if args[:1] == ["--output-dir"] and len(args) == 2:
        output_dir = Path(args[1]).resolve()
    elif args:
        raise BuildError("The package command takes only `--output-dir DIR`.")
    python = ensure_venv()
    zips = package_extension(output_dir, python=str(python))
    for path in zips:
        print(f"Built {path}")
    return 0


def command_env(_: list[str]) -> int:
    ensure_venv()
    ensure_blender_lts_venv()
    return 0


def command_lock(_: list[str]) -> int:
    """Re-resolve both environments from scratch without the locks and write what they got."""
    scratch = ROOT / "build" / "lock"
    if scratch.exists():
        shutil.rmtree(scratch)
    main = ensure_venv(scratch / "venv", locked=False)
    lts = ensure_blender_lts_venv(scratch / "venv-blender-lts", locked=False)
    write_lock(MAIN_LOCK, freeze(main))
    write_lock(BLENDER_LTS_LOCK, freeze(lts))
    print(f"Wrote {MAIN_LOCK} and {BLENDER_LTS_LOCK}; run `python build.py test` with them and "
          f"commit locks/ if the suite passes.")
    return 0


def command_mutate(args: list[str]) -> int:
    """mutmut over the modules `[tool.mutmut]` in pyproject.toml names, then its survivors.

    mutmut works in a `mutants/` copy beside the checkout; the checkout is not changed.
    """
    python = ensure_venv()
    mutmut = [str(python), "-m", "mutmut"]
    code = subprocess.call([*mutmut, "run", *args], cwd=ROOT)
    if code:
        return code
    return subprocess.call([*mutmut, "results"], cwd=ROOT)


COMMANDS = {"test": command_test, "demo": command_demo, "env": command_env,
            "package": command_package, "mutate": command_mutate, "lock": command_lock}


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    if argv and argv[0] not in COMMANDS:
        print(f"Unknown command {argv[0]!r}; use one of: {', '.join(COMMANDS)} "
              f"(or no argument to build the extension).", file=sys.stderr)
        return 2
    command = COMMANDS[argv[0]] if argv else command_package
    try:
        return command(argv[1:])
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
