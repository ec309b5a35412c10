"""One edit across several processes, without Ray: a gang (backend/gang.py) running the
Wan edit under Ulysses context parallelism (backend/backbones/context_parallel.py), in
plain torch.distributed over gloo on loopback with two spawned processes: the 2-rank edit
of the tiny Wan equals the single-process edit, the guidance gradient at each Adam step
and the final latent.

Apart from the gang on Ray (tests/test_gang.py) so that these run beside the Ray tests'
one process (their xdist group, build.py test), not in turn inside it.
"""

from __future__ import annotations

import pytest
import torch

from backend.errors import BadSettingsError
from tests.gang_support import gang_edit, single_edit

# The ranks compute the same sums in another order (a token's rows in another batch);
# on a CPU the tests find them equal to the last bit, the bound allows for rounding.
FLOAT_PRECISION = 1e-5


@pytest.fixture(scope="module")
def single_and_gang(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gang-edit")
    return single_edit(folder / "single"), gang_edit(folder / "gang")


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= FLOAT_PRECISION * max(1.0, a.abs().max().item()))


def test_a_two_rank_gang_edits_exactly_as_one_process(single_and_gang):
    single, ranks = single_and_gang
    assert single["gang"] == 1 and [rank["gang"] for rank in ranks] == [2, 2]
    steps = len(single["gradients"])
    assert steps == 2  # two guided steps of one Adam iteration each
    for rank in ranks:
        assert len(rank["gradients"]) == steps
        for alone, together in zip(single["gradients"], rank["gradients"], strict=True):
            assert alone.abs().max() > 0 and close(alone, together)
        assert close(single["latent"], rank["latent"])
    assert torch.equal(ranks[0]["frames"], ranks[1]["frames"])


def test_ulysses_refuses_a_gang_that_does_not_divide_the_heads():
    from backend.backbones.context_parallel import enable_ulysses
    from backend.backbones.wan_tiny import build_tiny_wan

    transformer = build_tiny_wan()["transformer"]  # 2 heads
    with pytest.raises(BadSettingsError, match="2 attention heads, which a gang of 3 cannot split"):
        enable_ulysses(transformer, 3, torch.device("cpu"))


def test_zeroscope_on_a_gang_is_not_split_and_sums_no_gradient():
    """ZeroScope's UNet3D has no context parallel plan: its gang's jobs run on rank 0
    alone (backend/cluster/gang.py), as one process would run them."""
    from backend.edit import load_engine
    from backend.gang import GangMember
    from backend.method.engine import Engine

    engine = load_engine("tiny", device="cpu", gang=GangMember(rank=0, size=2, timeout_s=5.0))
    assert engine.backbone.gang_size() == 1
    assert engine.gradient_reducer is Engine(engine.backbone).gradient_reducer
