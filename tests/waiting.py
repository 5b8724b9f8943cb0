"""Waiting for what a server does behind its answers (metrics, records, a reload): polled, bounded,
and failing with what was awaited. Light: subprocess scripts of the tests import it too."""
from __future__ import annotations

import asyncio
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout_s: float = 60.0, interval_s: float = 0.05) -> T:
    """``condition()``'s first true result; fails naming ``what`` once ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        time.sleep(interval_s)
    return result


async def until(condition: Callable[[], T], what: str, timeout_s: float = 60.0, interval_s: float = 0.05) -> T:
    """``wait_until`` for a test's event loop: the loop runs on while it waits."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        await asyncio.sleep(interval_s)
    return result


def wait_while_progressing(progress: Callable[[], int], goal: int, what: str, stall_s: float = 60.0,
                           interval_s: float = 0.05) -> None:
    """Wait until ``progress()`` reaches ``goal``; fail only once it has not moved for ``stall_s``.

    For a large workload whose total time depends on the machine: a slow machine makes slow
    progress and passes, a stuck one (nothing completes any more) fails, naming ``what``."""
    seen, moved_at = progress(), time.monotonic()
    while seen < goal:
        time.sleep(interval_s)
        now, current = time.monotonic(), progress()
        if current != seen:
            seen, moved_at = current, now
        assert now - moved_at < stall_s, f"{what}: {goal - seen} of {goal} left, none for {stall_s:.0f} s"
