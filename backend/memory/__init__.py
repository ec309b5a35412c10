"""GPU (and host) memory of an edit: planned before anything loads, saved while it runs.

    counter.py     the counter: fake storage on the meta device (`fake_world`), LiveBytes
                   (the live tensor bytes and their peak), CudaAutocast (CUDA's autocast
                   rules on CPU tensors), the allocator's block rounding
    cpu_terms.py   what a CPU plan adds to the tensors: convolution column buffers and
                   the clip's host frames
    planner.py     the memory plan: an edit's phases run on a fake backbone while the
                   counter counts (`plan_edit`), every combination of savers priced from
                   per-phase figures measured once, the cheapest that fits
                   (`choose_savers`) and the planner that caches plans and decides them
                   for a GPU (`MemoryPlanner`)
    phases.py      the phase calls the planner runs (`EditPhases`, a Protocol): the
                   engine is handed in by whoever plans, never imported
    savers.py      the savers as applied: the decision handed to an edit
                   (`MemoryDecision`), the setting savers (`with_savers`), VAE tiling and
                   the offloads (`savers_applied`) and the out-of-memory sentence

Which way it imports: from backend.backbones, backend.errors, backend.results,
backend.video and shared/ only, never from backend.method, directly or lazily. The
method sits above: the engine imports savers.py (it applies the savers it is handed
and plans nothing) and regions.py asks counter.py whether tensor values are known
(`values_unknown`). Within the package planner.py imports the other modules and none
imports it back; cpu_terms.py imports counter.py; savers.py, phases.py and counter.py
import nothing of the package.

Who plans: the command line (`memory`, and `transfer`'s check before loading), the
server (backend/server/app.py, requests.py, worker.py through planning.py's
ServerMemory), the Ray gateway (backend/cluster/gateway.py) and the tools; each hands
the planner backend/edit.py `engine_phases`.
"""
