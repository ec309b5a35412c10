"""Understudy's GPU backend: motion transfer engine, job server and command line.

Run `python -m backend --help` for the commands.
"""

__version__ = "0.1.0"
