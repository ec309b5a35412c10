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
