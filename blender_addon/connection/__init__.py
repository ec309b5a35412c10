"""The backend as the extension sees it: the connection to any server (link.py) and the
backend on this computer (local.py runs it from Blender; install.py, lock.py and
process.py decide, in plain Python)."""
