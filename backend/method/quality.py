"""Quality: which of the final's sampling steps an edit runs, and how hard it guides them.

A final runs every step of its `steps`-step grid: guidance (Adam on the SMM loss) on the
first `guided_step_count()` of them, a CFG step on each, and a restart after each but
the last. A preview is a cheaper recipe of the same edit, `PREVIEW` below: the same
clip, size, seed and initial latent, on a strided subset of the SAME grid

    final:    indices 0, 1, 2, …, steps − 1
    preview:  indices 0, s, 2s, …   (s = PREVIEW.stride; each step spans s of the final's)

so every timestep a preview visits, and every timestep it guides, is one the final's
inversion keeps: a preview and then the final of the same clip read one cached
inversion (backend/method/inversion.py; its key is the final's grid, whatever the
quality). `SamplingPlan` is what the engine's sampling loop walks.

Cost (forward-equivalents, FE; backend/method/cost.py), at the models' defaults (50
steps, 10 Adam iterations, restart; ZeroScope guides 20 steps, Wan 10), with s the
truncated pass's share and C = 2 passes per CFG step:

    final re-edit   = C·(50 + 49) + G·10·3s          ZeroScope 198 + 600s, Wan 198 + 300s
    preview re-edit = C·10 + g·3·3s                  ZeroScope  20 +  36s, Wan  20 +  18s
                      (g: the preview steps inside the final's guided stretch, 4 and 2)

about 1/10 of the final for any s in [0, 1] (the target is at most 1/8), before the step
cache saves anything more on the unguided steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.settings import TransferSettings


@dataclass(frozen=True)
class PreviewRecipe:
    """The preview's recipe, as data. Why each number:

    stride 5: every 5th timestep of the final's grid, 10 of 50 — the fewest steps at which
        ZeroScope's DDIM and Wan's flow still land on a clean frame (their 10-step samplers
        are the usual fast setting), and 50 / 5 keeps the preview's steps on the final's
        grid, so both share one inversion.
    guidance_iterations 3: of the final's 10 Adam iterations per guided step; the first
        iterations move the latent most (the loss falls fastest at the start), and the
        guided steps are already fewer (the preview's steps within the final's guided
        stretch: 4 of ZeroScope's 20, 2 of Wan's 10).
    restart False: a restart re-noises and repeats every step, doubling the CFG passes;
        a preview shows the motion and the subject, which restart only refines.
    step_cache True: on the steps without guidance, the backbone's forward-only step
        cache (Backbone.step_cache: diffusers' FirstBlockCache on Wan; none fits
        ZeroScope's UNet, which runs fewer steps alone). Never during guidance.
    upscale False: the upscaling stage is a final's finish; a preview is at the model's size.
    """

    stride: int = 5
    guidance_iterations: int = 3
    restart: bool = False
    step_cache: bool = True
    upscale: bool = False


PREVIEW = PreviewRecipe()


@dataclass(frozen=True)
class SamplingPlan:
    """The steps one edit runs, on the grid of `steps` (the settings' steps, the final's).

    indices: the grid indices it visits, noisiest first; step k goes from grid index
        indices[k] to indices[k + 1] (the clean end after the last), a span of spans[k].
    learning_rates: the Adam learning rate of each guided step (the first
        len(learning_rates) steps are guided): the final's rate at the same grid index.
    """

    steps: int
    indices: tuple[int, ...]
    learning_rates: tuple[float, ...]
    guidance_iterations: int
    restart: bool
    step_cache: bool

    @property
    def guided_steps(self) -> int:
        return len(self.learning_rates)

    @property
    def spans(self) -> tuple[int, ...]:
        ends = (*self.indices[1:], self.steps)
        return tuple(end - start for start, end in zip(self.indices, ends, strict=True))


def sampling_plan(settings: TransferSettings) -> SamplingPlan:
    """The plan of resolved `settings` at their quality: the final's every step, or the
    preview's strided subset (PREVIEW) of the same grid."""
    final_rates = settings.guidance_learning_rates()
    if settings.quality == "final":
        return SamplingPlan(settings.steps, tuple(range(settings.steps)), tuple(final_rates),
                            settings.guidance_iterations, settings.restart, step_cache=False)
    indices = tuple(range(0, settings.steps, PREVIEW.stride))
    guided = [index for index in indices if index < len(final_rates)]
    return SamplingPlan(settings.steps, indices, tuple(final_rates[index] for index in guided),
                        min(PREVIEW.guidance_iterations, settings.guidance_iterations),
                        restart=PREVIEW.restart and settings.restart, step_cache=PREVIEW.step_cache)


def planned_passes(plan: SamplingPlan, windows: int) -> dict[tuple[str, str], int]:
    """The model passes the sampling loop runs for `plan` over `windows` windows, as the
    engine counts them (Engine.model_passes, cached source features): per step 2 CFG
    passes per window, again after a restart (every step but the last), and per guided
    step and Adam iteration one truncated forward and backward per window."""
    restarts = len(plan.indices) - 1 if plan.restart else 0
    guided = plan.guided_steps * plan.guidance_iterations * windows
    passes = {("sample", "full"): 2 * (len(plan.indices) + restarts) * windows}
    if guided:
        passes |= {("guide", "truncated"): guided, ("guide", "truncated_backward"): guided}
    return passes
