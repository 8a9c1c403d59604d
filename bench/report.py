"""What every benchmark shares: where the repository is, and how a figure is printed against
its target. Run the benchmarks from the repository root as modules (``python -m
bench.outbound``), so that they import the package and the test suite's fakes as they are."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def verdict(met: bool) -> str:
    return "TARGET MET" if met else "TARGET MISSED"


def row(
    label: str,
    value: str,
    target: str = "",
    met: bool | None = None,
    *,
    widths: tuple[int, int, int] = (30, 46, 14),
) -> str:
    """One line of a report: a label, the figure, and when there is one, the target and
    whether the figure meets it."""
    label_width, value_width, target_width = widths
    line = f"  {label:<{label_width}}{value:<{value_width}}"
    if target:
        line += f"{target:<{target_width}}{verdict(bool(met))}"
    return line.rstrip()
