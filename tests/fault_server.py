"""`python -m tests.fault_server serve …`: the real server on a file system that fails
on demand, as a full disk, a read-only remount or a process out of file handles do.

While the file named by $UNDERSTUDY_FAULT_FILE exists, every write, rename or mkdir
under the --state-dir raises OSError with the errno named in that file (ENOSPC,
EROFS, EMFILE, …); "ENOSPC status.json" fails only paths ending in status.json.
Removing the file is the disk getting space back.
"""

from __future__ import annotations

import builtins
import errno
import os
import sys
from pathlib import Path


def install(control: Path, state_dir: Path) -> None:
    real_open, real_replace, real_mkdir = builtins.open, os.replace, os.mkdir
    root = str(state_dir.resolve())

    def check(path) -> None:
        if not os.path.abspath(os.fspath(path)).startswith(root):
            return
        try:
            with real_open(control) as file:
                name, _, suffix = file.read().strip().partition(" ")
        except FileNotFoundError:
            return
        if os.fspath(path).endswith(suffix):
            code = getattr(errno, name)
            raise OSError(code, os.strerror(code), os.fspath(path))

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, str | bytes | os.PathLike) and any(c in mode for c in "wax+"):
            check(file)
        return real_open(file, mode, *args, **kwargs)

    def replace(source, target, *args, **kwargs):
        check(target)
        return real_replace(source, target, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        check(path)
        return real_mkdir(path, *args, **kwargs)

    builtins.open, os.replace, os.mkdir = open_, replace, mkdir


def main(argv: list[str]) -> int:
    state_dir = Path(argv[argv.index("--state-dir") + 1])
    state_dir.mkdir(parents=True, exist_ok=True)
    install(Path(os.environ["UNDERSTUDY_FAULT_FILE"]), state_dir)
    from backend.cli import main as backend_main

    return backend_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
