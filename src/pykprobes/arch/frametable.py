"""Per-frame tables of the breakpoint arches, kept bounded.

Both arches remember things per frame object (a post-handler waiting for the next
instruction, a generator thrown into at a yield). A frame that leaves by a path no event
reports leaves its entry behind, so a table over `PENDING_CAP` is trimmed: first the entries
of dead frames, then the oldest ones.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any, Final

PENDING_CAP: Final = 4096


def trim(table: dict[FrameType, Any]) -> int:
    """Drop the dead frames' entries, then the oldest down to half the cap; returns how
    many went. Never raises (it runs on the hot path)."""
    dropped = 0
    try:
        for frame in list(table):
            # The table, the loop variable, getrefcount's argument: nobody else holds the
            # frame, so it is neither executing nor resumable.
            if sys.getrefcount(frame) <= 3 and table.pop(frame, None) is not None:
                dropped += 1
        excess = len(table) - PENDING_CAP // 2
        if excess > 0:
            for frame in list(table)[:excess]:
                if table.pop(frame, None) is not None:
                    dropped += 1
    except BaseException:  # noqa: BLE001 - never reaches the program
        pass
    return dropped
