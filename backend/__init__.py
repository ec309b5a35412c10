"""Understudy's GPU backend: motion transfer engine, job server and command line.

Run `python -m backend --help` for the commands.
"""

import os

# On a CPU, OpenMP's spinning worker threads slow torch down many times over as soon as
# another busy process shares the cores (Blender, a client, a second job). Passive
# waiting costs little when the machine is idle. It must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
