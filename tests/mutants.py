"""Named mutants: deliberate one-line bugs the suite must catch.

Each mutant is a bug someone could plausibly write, in the engine loop or in a
promise the server makes, together with the tests that must fail when it is applied.
tests/test_mutants.py applies each one to a temporary copy of the project and runs
those tests there; a mutant the tests let through fails the suite. A mutant whose
`original` text no longer occurs exactly once in its file also fails, so the list
keeps up with the code. How to add one, and mutmut for the pure modules:
docs/testing.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    original: str  # text that occurs exactly once in `path`
    mutated: str  # what replaces it
    tests: tuple[str, ...]  # pytest node ids or files; at least one must fail

    def __str__(self) -> str:
        return self.name


MUTANTS: tuple[Mutant, ...] = (
    # --- the engine loop (backend/engine.py) and its pure helpers
    Mutant(
        "guidance climbs the loss instead of descending it",
        "backend/engine.py",
        "scaler.scale(loss).backward()",
        "scaler.scale(-loss).backward()",
        ("tests/test_engine.py::test_the_engines_guidance_step_lowers_the_pairwise_smm_loss",),
    ),
    Mutant(
        "the denoising step gets the unguided latent",
        "backend/engine.py",
        "latent = self._guide(latent, timestep,",
        "self._guide(latent, timestep,",
        ("tests/test_engine.py::test_guided_steps_change_the_result_and_denoising_gets_the_guided_latent",),
    ),
    Mutant(
        "no step is guided",
        "backend/engine.py",
        "if index < guided_steps:",
        "if False:",
        ("tests/test_engine.py::test_guided_steps_change_the_result_and_denoising_gets_the_guided_latent",),
    ),
    Mutant(
        "the restart step is skipped",
        "backend/engine.py",
        "restarts = settings.restart and not is_last",
        "restarts = False",
        ("tests/test_engine.py::test_restart_costs_two_more_unet_passes_per_step_and_changes_the_result",),
    ),
    Mutant(
        "an unseeded edit always uses seed 0",
        "backend/engine.py",
        "random.SystemRandom().randrange(2**31)",
        "0",
        ("tests/test_engine.py::test_seed_is_random_unless_given_and_always_recorded",),
    ),
    Mutant(
        "the sidecar records the requested seed, not the one used",
        "backend/engine.py",
        '"seed": seed,',
        '"seed": settings.seed,',
        ("tests/test_engine.py::test_seed_is_random_unless_given_and_always_recorded",),
    ),
    Mutant(
        "guidance never scales the loss before backward",
        "backend/engine.py",
        "enabled=self._scales_loss())",
        "enabled=False)",
        ("tests/test_engine.py::test_guidance_scales_the_loss_before_backward_where_fp16_gradients_could_underflow",),
    ),
    Mutant(
        "window blend weights are not normalised",
        "backend/windows.py",
        "return raw / total",
        "return raw",
        ("tests/test_windows.py",),
    ),
    Mutant(
        "window blend weights are flat instead of falling off toward the edges",
        "backend/windows.py",
        "return min(frame - start + 1, end - frame)",
        "return 1",
        ("tests/test_windows.py",),
    ),
    Mutant(
        "a cache hit does not count as a use",
        "backend/inversion.py",
        "os.utime(path)  # most recently used",
        "pass",
        ("tests/test_engine.py::test_inversion_cache_keeps_the_most_recently_used_files_within_its_cap",),
    ),
    Mutant(
        "the guided part is a fixed 20 steps",
        "shared/settings.py",
        "return self.steps - int(self.steps * (1 - self.guided_fraction))",
        "return 20",
        ("tests/test_settings.py::test_the_guided_part_is_the_references_fraction_of_the_steps",),
    ),
    Mutant(
        "pairwise loss compares the differences with the wrong sign",
        "backend/guidance.py",
        "source_diffs = source[None, :, :] - source[:, None, :]",
        "source_diffs = source[:, None, :] - source[None, :, :]",
        ("tests/test_guidance.py",),
    ),
    Mutant(
        "a peer accepts any protocol version",
        "shared/protocol.py",
        "if version != PROTOCOL_VERSION:",
        "if False:",
        ("tests/test_protocol.py",),
    ),
)
