"""Calendar helpers shared by the generator's demand model and the forecasters' holiday features.

>>> nth_weekday(2026, 11, 3, 4)  # Thanksgiving 2026: the fourth Thursday of November
datetime.date(2026, 11, 26)
>>> nth_weekday(2026, 5, 0, -1)  # Memorial Day 2026: the last Monday of May
datetime.date(2026, 5, 25)
"""

from __future__ import annotations

from datetime import date, timedelta


def nth_weekday(year: int, month: int, weekday: int, n: int) -> date:
    """The n-th (1-based; -1 = last) ``weekday`` (Mon=0) of a month."""
    if n > 0:
        d = date(year, month, 1)
        d += timedelta(days=(weekday - d.weekday()) % 7)
        return d + timedelta(weeks=n - 1)
    d = date(year + (month == 12), month % 12 + 1, 1) - timedelta(days=1)
    return d - timedelta(days=(d.weekday() - weekday) % 7)
