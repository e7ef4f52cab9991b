"""Polling with a deadline of its own: a condition that never comes fails the test in
seconds, saying what it waited for, instead of hanging until pytest's 300 s timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def until(
    condition: Callable[[], object], what: str, timeout_s: float = 10.0, blocking: bool = False
) -> None:
    """`blocking`: the condition does I/O (asks another process), so it runs in a thread and
    is asked less often, leaving the event loop to the test's own load."""
    deadline = time.monotonic() + timeout_s
    while not (await asyncio.to_thread(condition) if blocking else condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(0.05 if blocking else 0.001)
