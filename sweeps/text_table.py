"""A plain text table on the console: the sweeps' result tables and the benchmarks' figures."""
from __future__ import annotations

from typing import Any


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    """``title`` after a blank line, then ``header`` and ``rows`` in left-aligned columns two
    spaces apart; floats get 3 decimals (none from 1000 on), anything else ``str``."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
