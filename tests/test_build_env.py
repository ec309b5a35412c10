"""build.py's environment logic: fresh, reused, refreshed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


def load_build_module():
    spec = importlib.util.spec_from_file_location("understudy_build", REPO_ROOT / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = load_build_module()

PYPROJECT = """
[project]
name = "x"
dependencies = ["numpy>=1"]
[project.optional-dependencies]
test = ["pytest"]
[tool.ruff]
line-length = 100
"""


def fake_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    python = build.venv_python(venv)
    python.parent.mkdir(parents=True)
    python.write_text("")
    return venv


def test_missing_venv_is_created(tmp_path):
    wanted = build.wanted_stamp(PYPROJECT, "torch==2.13.0", (3, 11))
    assert build.venv_state(tmp_path / "nothing", wanted) == "missing"


def test_unchanged_dependencies_reuse_the_venv(tmp_path):
    venv = fake_venv(tmp_path)
    wanted = build.wanted_stamp(PYPROJECT, "torch==2.13.0", (3, 11))
    (venv / build.STAMP_NAME).write_text(json.dumps(wanted))
    assert build.venv_state(venv, wanted) == "fresh"
    # Tool settings are not dependencies: editing them keeps the venv.
    edited = PYPROJECT.replace("line-length = 100", "line-length = 120")
    assert build.venv_state(venv, build.wanted_stamp(edited, "torch==2.13.0", (3, 11))) == "fresh"


def test_changed_dependencies_refresh_the_venv(tmp_path):
    venv = fake_venv(tmp_path)
    old = build.wanted_stamp(PYPROJECT, "torch==2.13.0", (3, 11))
    (venv / build.STAMP_NAME).write_text(json.dumps(old))
    added = PYPROJECT.replace('["numpy>=1"]', '["numpy>=1", "rich"]')
    assert build.venv_state(venv, build.wanted_stamp(added, "torch==2.13.0", (3, 11))) == "stale"
    assert build.venv_state(venv, build.wanted_stamp(PYPROJECT, "none", (3, 11))) == "stale"


def test_interrupted_install_is_redone(tmp_path):
    venv = fake_venv(tmp_path)  # interpreter present, no stamp: the install never finished
    assert build.venv_state(venv, build.wanted_stamp(PYPROJECT, "t", (3, 11))) == "stale"


def test_other_python_recreates_the_venv(tmp_path):
    venv = fake_venv(tmp_path)
    (venv / build.STAMP_NAME).write_text(json.dumps(build.wanted_stamp(PYPROJECT, "t", (3, 10))))
    assert build.venv_state(venv, build.wanted_stamp(PYPROJECT, "t", (3, 11))) == "missing"


def test_wrong_python_is_one_sentence(monkeypatch):
    monkeypatch.setattr(build.sys, "version_info", (3, 9, 0))
    monkeypatch.setattr(build.sys, "version", "3.9.0 (fake)")
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(build.BuildError, match="needs Python 3.11.*python3.11 build.py test"):
        build.find_python311()


def test_this_checkout_venv_is_up_to_date():
    """The environment running these tests is the one build.py would reuse."""
    venv = Path(sys.prefix)
    if venv.resolve() != (REPO_ROOT / ".venv").resolve():
        pytest.fail(f"tests should run inside the project's .venv, not {venv}; use build.py test")
    wanted = build.wanted_stamp((REPO_ROOT / "pyproject.toml").read_text(),
                                json.loads((venv / build.STAMP_NAME).read_text())["torch"],
                                build.REQUIRED_PYTHON, build.read_lock(build.MAIN_LOCK))
    assert build.venv_state(venv, wanted) == "fresh"


def test_this_environment_holds_the_locked_versions():
    """What the suite runs with is what the lock promises a fresh machine."""
    import importlib.metadata

    locked = [line.split("==") for line in build.read_lock(build.MAIN_LOCK).splitlines()
              if line and not line.startswith("#")]
    assert len(locked) > 20
    different = {name: (version, importlib.metadata.version(name)) for name, version in locked
                 if importlib.metadata.version(name) != version}
    assert different == {}


def test_the_lock_pins_what_pyproject_asks_for():
    names = {line.split("==")[0].lower() for line in build.read_lock(build.MAIN_LOCK).splitlines()
             if line and not line.startswith("#")}
    for needed in ("diffusers", "transformers", "accelerate", "pyzmq", "ray", "bpy", "numpy"):
        assert needed in names


def test_lock_lines_pin_distributions_and_leave_torch_to_the_user():
    frozen = ("# comment\n-e git+https://x#egg=understudy\nzeta==1.0\ntorch==2.13.0+cpu\n"
              "nvidia-cublas-cu12==12.1\ntriton==3.0\nAlpha==2.0+local\nweird @ file:///x\n")
    assert build.lock_lines(frozen) == ["Alpha==2.0", "zeta==1.0"]


def test_a_changed_lock_refreshes_the_venv(tmp_path):
    venv = fake_venv(tmp_path)
    old = build.wanted_stamp(PYPROJECT, "t", (3, 11), "numpy==1.0\n")
    (venv / build.STAMP_NAME).write_text(json.dumps(old))
    assert build.venv_state(venv, build.wanted_stamp(PYPROJECT, "t", (3, 11), "numpy==1.0\n")) == "fresh"
    assert build.venv_state(venv, build.wanted_stamp(PYPROJECT, "t", (3, 11), "numpy==2.0\n")) == "stale"


def test_installs_are_constrained_by_the_lock(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks" / "main.txt").write_text("numpy==1.0\n")
    venv = fake_venv(tmp_path)
    commands = []
    monkeypatch.setattr(build, "run_checked", lambda command, failure: commands.append(command))
    build.ensure_venv(venv, root=tmp_path)
    lock = str(tmp_path / "locks" / "main.txt")
    assert commands[-1][-4:] == ["-c", lock, "-e", f"{tmp_path}[test,cluster]"]


def test_a_missing_lock_is_one_sentence(tmp_path):
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    with pytest.raises(build.BuildError, match="lock file .* is missing.*build.py lock"):
        build.ensure_venv(fake_venv(tmp_path), root=tmp_path)


def test_unknown_command_fails_with_a_message():
    result = subprocess.run([sys.executable, str(REPO_ROOT / "build.py"), "frobnicate"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "Unknown command 'frobnicate'" in result.stderr


def test_the_suites_xdist_groups_keep_their_tests_in_one_process(tmp_path):
    """build.py test's `--dist loadgroup` keeps an xdist_group in one test process (the
    Ray tests rely on it: one Ray head at a time). pytest 9.2 with pytest-xdist 3.8 broke
    this silently (the group marks were ignored); the pin in pyproject.toml holds it."""
    (tmp_path / "test_grouped.py").write_text(
        "import pytest\npytestmark = pytest.mark.xdist_group('one')\n"
        + "".join(f"def test_{k}():\n    pass\n" for k in range(6)))
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v",
                          *build.SUITE_PARALLEL_ARGS[:4], "test_grouped.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:]
    passed = [line.split()[0] for line in run.stdout.splitlines() if " PASSED " in line]
    assert len(passed) == 6 and len(set(passed)) == 1, run.stdout[-2000:]  # one "[gwN]"
