"""Side-by-side timing of our code and a peer's in one process (the e2e benches' shared loop).

Absolute times on a shared machine are noise; a ratio from rounds that alternate who runs first,
taken in one process on the same inputs, is not. One warm-up call of each, then ``rounds`` rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_ratio(ours: Callable[[], object], peer: Callable[[], object], rounds: int,
                      name: str, peer_name: str) -> list[float]:
    """Time ``ours`` and ``peer`` in alternating order over ``rounds`` rounds after a warm-up of each;
    print the medians and the peer/ours ratio (median, min, max) and return the per-round ratios."""
    ours(), peer()  # warm-up
    t_ours, t_peer = [], []
    for r in range(rounds):
        pair = ((t_ours, ours), (t_peer, peer)) if r % 2 == 0 else ((t_peer, peer), (t_ours, ours))
        for times, fn in pair:
            times.append(timed(fn))
    ratios = [b / a for a, b in zip(t_ours, t_peer)]
    print(f"{name}: ms median ours {1e3 * statistics.median(t_ours):.0f}  {peer_name} "
          f"{1e3 * statistics.median(t_peer):.0f}  peer/ours {statistics.median(ratios):.2f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})", flush=True)
    return ratios
