"""Running the job server's jobs on a Ray cluster: many GPUs behind one address.

    python -m backend serve --ray auto --keys keys/      # join the Ray cluster on this machine
    python -m backend serve --ray local:3 --model tiny   # a private local instance, 3 slots

The ZeroMQ gateway (backend/server/) stays the only door and its job store the source
of truth; this package only runs the jobs its job threads hand out, one thread per
actor (backend/server/job_thread.py), each claiming the head of the FIFO queue:

- `connect.py`         start or join Ray from `--ray ADDRESS` with token authentication
                       on, and say how many workers the cluster holds (one per GPU,
                       or per slot)
- `engine_actor.py`    the Ray actor (`EngineActor`): one warm engine, one job at a
                       time, progress streamed back, a cooperative cancel accepted
                       while a job runs
- `runner.py`          the gateway's handle on one actor: runs a job there, relays
                       progress and cancel, kills the actor when a cancel is not
                       honoured, and turns the actor's death into `ActorLost` (the
                       server's EngineLost)
- `engine_handles.py`  one actor in the shape of the server's engine (`ActorEngine`:
                       describe, check_settings, transfer) plus `wait_ready`
- `pool.py`            the actors of one gateway: created, waited for, closed
- `gateway.py`         what `serve --ray` adds to the server: the options, start and
                       close, and the memory plan, for the smallest GPU among the workers
- `bench.py`           throughput of K small jobs through real gateways with 1, 2, 3
                       workers

Ray is an optional dependency (`pip install .[cluster]`): nothing outside this package
imports it, and this package imports it only when `--ray` is given.
"""
