"""Progress bars for long jobs (tqdm), or a silent stand-in when progress is off."""

from __future__ import annotations

from typing import Any


class _NoBar:
    def update(self, n):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def progress_bar_or_none(total: int, enabled: bool, desc: str, unit: str, initial: int = 0) -> Any:
    """A tqdm bar with ETA (or a no-op object with the same methods when not `enabled`)."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(initial=initial, total=total, unit=unit, desc=desc, dynamic_ncols=True)
