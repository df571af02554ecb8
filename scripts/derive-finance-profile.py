#!/usr/bin/env python3
"""Derives the FINANCE demand profile that vMatrix ships from the SPY per-minute volume trace.

The SPY file (../shared/traces/finance_spy_2025-07_volume_per_min.csv) may not be republished,
so the project ships only this derivative: the average weekday intraday shape.

  1. Read `t_seconds,value` (value = SPY shares traded in that minute, t=0 is
     2025-07-01 00:00 US/Eastern, a Tuesday).
  2. Keep the full trading days: weekdays with trading that are not the July 3 early close or
     the July 4 holiday (20 days).
  3. For each minute of the day, average the volume over those days.
  4. Scale so the largest minute is 1000 (a unit-free shape; `vmatrix sim --peak-rps` rescales).

Writes, into the directory given (default examples/traces):
  finance_weekday_profile_per_min.csv   one day, 1440 rows
  finance_profile_4weeks_per_min.csv    the profile on weekdays and 0 on weekends, 28 days
                                        from a Monday (what `vmatrix sim` reads as a trace)
"""
import csv
import os
import sys

src = sys.argv[1] if len(sys.argv) > 1 else "../shared/traces/finance_spy_2025-07_volume_per_min.csv"
out = sys.argv[2] if len(sys.argv) > 2 else "examples/traces"

values = {}
with open(src) as f:
    for row in csv.DictReader(f):
        values[int(row["t_seconds"])] = float(row["value"])

days = {}
for t, v in values.items():
    days.setdefault(t // 86400, {})[(t % 86400) // 60] = v

# Day 0 is Tuesday 2025-07-01: weekday = (day + 1) % 7 with Monday = 0.
full = [
    d for d, minutes in sorted(days.items())
    if (d + 1) % 7 < 5 and d not in (2, 3) and sum(minutes.values()) > 0
]
profile = [sum(days[d].get(m, 0.0) for d in full) / len(full) for m in range(1440)]
peak = max(profile)
profile = [v * 1000.0 / peak for v in profile]

os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "finance_weekday_profile_per_min.csv"), "w") as f:
    f.write("t_seconds,value\n")
    for m, v in enumerate(profile):
        f.write(f"{m * 60},{v:.3f}\n")
with open(os.path.join(out, "finance_profile_4weeks_per_min.csv"), "w") as f:
    f.write("t_seconds,value\n")
    for d in range(28):
        weekday = d % 7 < 5  # day 0 is a Monday
        for m in range(1440):
            f.write(f"{(d * 1440 + m) * 60},{profile[m] if weekday else 0.0:.3f}\n")
print(f"{len(full)} full trading days averaged; wrote {out}/finance_*_per_min.csv")
