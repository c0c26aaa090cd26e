"""Five-field cron (UTC) without dependencies: the next fire time after a moment."""

from __future__ import annotations

from datetime import datetime, timedelta

_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 6)]  # minute hour day-of-month month day-of-week


def _field(text: str, lo: int, hi: int) -> set[int]:
    values: set[int] = set()
    for part in text.split(","):
        step = 1
        if "/" in part:
            part, step_text = part.split("/", 1)
            step = int(step_text)
        if part == "*":
            start, end = lo, hi
        elif "-" in part:
            a, b = part.split("-", 1)
            start, end = int(a), int(b)
        else:
            start = int(part)
            end = hi if step > 1 else start
        values.update(v for v in range(start, end + 1, step) if lo <= v <= hi)
    return values


def next_fire(schedule: str, after: datetime) -> datetime:
    """The first minute strictly after `after` matching `schedule` (day-of-month and day-of-week
    combine with OR when both are restricted, as in Vixie cron; Sunday is 0 or 7)."""
    fields = schedule.split()
    minute, hour, dom, month, dow = (_field(f, lo, hi if i != 4 else 7) for i, (f, (lo, hi))
                                     in enumerate(zip(fields, _RANGES)))
    dow = {d % 7 for d in dow}
    dom_any, dow_any = fields[2] == "*", fields[4] == "*"
    t = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    limit = t + timedelta(days=366 * 5)
    while t < limit:
        if t.month not in month:
            t = (t.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
            continue
        day_ok = t.day in dom
        weekday_ok = (t.weekday() + 1) % 7 in dow
        if dom_any and dow_any:
            ok = True
        elif dom_any:
            ok = weekday_ok
        elif dow_any:
            ok = day_ok
        else:
            ok = day_ok or weekday_ok
        if not ok:
            t = t.replace(hour=0, minute=0) + timedelta(days=1)
            continue
        if t.hour not in hour:
            t = t.replace(minute=0) + timedelta(hours=1)
            continue
        if t.minute not in minute:
            t += timedelta(minutes=1)
            continue
        return t
    raise ValueError(f"schedule {schedule!r} never fires")
