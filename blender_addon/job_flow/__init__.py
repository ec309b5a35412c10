"""A job's way from the strip to its result: jobs.py holds the job lists and makes every
change of a job's state, calling its steps in order (rendering.py, following.py,
collecting.py), which never import each other or jobs.py; files.py tells jobs.py of
file events; batches.py counts frames per timer tick."""
