"""Canonical data partitions: the layout arithmetic that makes the data position world-size free.

The epoch's global sample sequence is cut into P contiguous partitions (`data.partitions`, fixed
for the life of a run and recorded in its checkpoints). With W ranks of micro-batch B, the
micro-step global batch is GM = W * B and every partition gives GM / P samples to each of them;
so P must divide GM and W must divide P (rank r owns partitions [r*P/W, (r+1)*P/W)).

`data.partitions=0` (auto) picks, at a run's fresh start, among the divisors P of GM that are
multiples of W and at most max(256, W * max(1, num_workers)): first the P that lets the most
worker processes split each rank's partitions evenly (the largest divisor of P/W not above
num_workers), then the largest such P. When some P is a multiple of W * num_workers this is
the largest divisor of GM that is a multiple of W * max(1, num_workers) and <= that bound. A
larger P leaves more world sizes to resume on (any W' dividing P, with B' a multiple of P/W');
the bound keeps the shard readers a worker holds open (data.shard_interleave per partition it
reads) few.
"""
from __future__ import annotations


def partition_span(total: int, partitions: int, p: int) -> tuple[int, int]:
    """(start, length) of partition p in the epoch's global sequence; lengths differ by <= 1."""
    base, extra = divmod(total, partitions)
    return p * base + min(p, extra), base + (1 if p < extra else 0)


def worker_count(per_rank: int, num_workers: int) -> int:
    """Worker processes a rank uses: the largest divisor of its partition count that is <= num_workers
    (each worker reads a fixed, equal share of the rank's partitions); 0 stays 0 (main process)."""
    if num_workers <= 0:
        return 0
    return max(d for d in range(1, min(per_rank, num_workers) + 1) if per_rank % d == 0)


def auto_partitions(world_size: int, batch_size: int, num_workers: int) -> int:
    """data.partitions=0: the rule in this module's docstring."""
    gm = world_size * batch_size
    bound = max(256, world_size * max(1, num_workers))
    candidates = [p for p in range(world_size, min(gm, bound) + 1, world_size) if gm % p == 0]
    return max(candidates, key=lambda p: (worker_count(p // world_size, max(1, num_workers)), p))


def partition_problem(partitions: int, world_size: int, batch_size: int) -> str | None:
    """Why `partitions` cannot serve W ranks of micro-batch B (the first half of a one-line error), or None."""
    gm = world_size * batch_size
    if partitions < 1:
        return f"data.partitions={partitions} must be >= 1 (0 chooses it at a fresh start)"
    if partitions % world_size:
        fits = [w for w in range(1, partitions + 1) if partitions % w == 0]
        return (f"data.partitions={partitions} is not a multiple of the world size {world_size}: "
                f"run on a number of ranks that divides it ({', '.join(map(str, fits))})")
    if gm % partitions:
        per_rank = partitions // world_size
        return (f"data.partitions={partitions} does not divide the micro-step global batch "
                f"{world_size} ranks x optim.batch_size={batch_size} = {gm}: use an optim.batch_size "
                f"that is a multiple of {per_rank} (= partitions / world size)")
    return None
