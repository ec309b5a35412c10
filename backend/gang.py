"""A gang: N processes that run one edit together, over one torch.distributed group.

    member = join_gang(GangAddress("127.0.0.1", 29517), rank=1, size=2, device="cpu")
    engine.gradient_reducer = member.reduce_gradient     # backend/method/engine.py's seam
    ...
    leave_gang()

Every rank runs the same edit (same seed, same Adam state) and holds the whole latent;
the Wan transformer splits its tokens across the ranks (Ulysses context parallelism,
backend/backbones/context_parallel.py), so each rank's backward pass reaches only its own
tokens' share of the latent's gradient. `reduce_gradient` sums the shares (an
all-reduce) before each Adam step, so every rank takes the step one process would.

The group is `"cpu:gloo,cuda:nccl"` on GPUs (NCCL for the model's tensors, gloo for
anything on the CPU) and gloo alone on CPUs. Every collective has the group's timeout:
a rank that died or stopped makes the others' next collective fail within it
(`GangStalled`, one sentence) instead of hanging the job, the worker or the gateway.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backend.errors import UnderstudyError
from shared.errors import ErrorCode

if TYPE_CHECKING:  # the gateway reads this module's names without loading torch
    import torch

# Long enough for the slowest collective of a real edit (a 14B model's gather on a busy
# node), short enough that a stopped rank fails the job instead of holding the gang.
DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0


class GangStalled(UnderstudyError):
    """A collective of the gang did not complete within its timeout: a rank died or
    stopped. The gang's job fails with this sentence."""

    code = ErrorCode.GANG_STALLED

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        # The collective ran out its whole timeout (a peer alive but silent: stopped, or a
        # link down), as opposed to failing at once on a peer that died.
        self.timed_out = timed_out


@dataclass(frozen=True)
class GangAddress:
    """Where rank 0 listens for the others (torch.distributed's TCP store)."""

    host: str
    port: int

    def url(self) -> str:
        return f"tcp://{self.host}:{self.port}"


@dataclass(frozen=True)
class GangMember:
    """This process's place in the gang."""

    rank: int
    size: int
    timeout_s: float

    @property
    def writes_result(self) -> bool:
        """Rank 0 alone writes the result and the sidecar; the others' copies are equal."""
        return self.rank == 0

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (an all-reduce of one number over gloo): every
        rank calls it at the same point of the same edit, and all get the same answer."""
        import torch
        import torch.distributed as dist

        value = torch.tensor([int(flag)])
        with stalls_named(self.timeout_s):
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def reduce_gradient(self, gradient: torch.Tensor) -> None:
        """Sum the ranks' shares of the latent's gradient in place (each rank's backward
        reached only its own tokens' share)."""
        all_reduce_sum(gradient, self.timeout_s)


def backend_for(device: str) -> str:
    """torch.distributed's backend: NCCL for CUDA tensors with gloo for CPU ones, or gloo."""
    return "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"


def join_gang(address: GangAddress, rank: int, size: int, device: str,
              timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> GangMember:
    """Join (rank 0: open) the gang's process group; blocks until all `size` ranks are in,
    or fails with GangStalled after `timeout_s`."""
    import torch.distributed as dist

    if dist.is_initialized():
        leave_gang()
    try:
        dist.init_process_group(backend_for(device), init_method=address.url(), rank=rank,
                                world_size=size, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, dist.DistError) as error:
        raise GangStalled(
            f"Rank {rank} could not join the gang of {size} at {address.url()} within "
            f"{timeout_s:.0f} s ({type(error).__name__}); check that every rank started and "
            "that the port is free.") from error
    return GangMember(rank, size, timeout_s)


def leave_gang() -> None:
    """Leave the process group (nothing when not in one)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, timeout_s: float) -> None:
    """dist.all_reduce(SUM) in place, a stalled peer turned into GangStalled."""
    import torch.distributed as dist

    with stalls_named(timeout_s):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


@contextmanager
def stalls_named(timeout_s: float) -> Iterator[None]:
    """Around a gang's collectives (an edit on a gang member): torch.distributed's
    error for a timed-out collective or a peer gone becomes GangStalled, one sentence."""
    try:
        yield
    except UnderstudyError:
        raise
    except RuntimeError as error:
        if not is_collective_failure(error):
            raise
        raise GangStalled(stalled_sentence(timeout_s, error),
                          timed_out="Timed out" in str(error)) from error


def is_collective_failure(error: BaseException) -> bool:
    """torch.distributed's errors (DistError and its kinds), and gloo's and NCCL's
    RuntimeErrors for a timed-out operation or a closed peer."""
    import torch.distributed as dist

    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return any(mark in text for mark in ("gloo", "Gloo", "NCCL", "Connection closed by peer",
                                         "Timed out"))


def stalled_sentence(timeout_s: float, error: BaseException) -> str:
    """The one sentence a job of a stalled gang fails with."""
    return (f"A rank of the gang stopped answering (a collective did not complete within "
            f"{timeout_s:.0f} s: {type(error).__name__}); the gang is being rebuilt, so "
            "submit the job again.")
