"""How the command line shows values: sparklines on a log scale with non-finite columns marked, and values."""

from __future__ import annotations

from gradwatch._format import fmt_value, sparkline


def test_sparkline_is_log_scaled_and_marks_non_finite_columns() -> None:
    steps = list(range(9))
    line = sparkline(steps, [10.0 ** k for k in range(8)] + ["Infinity"], 9, 0, 8)
    assert line == "▁▂▃▄▅▆▇█×"  # one decade a bar
    assert sparkline(steps, [None] * 9, 9, 0, 8) == " " * 9


def test_sparkline_holds_values_across_columns_of_a_short_run() -> None:
    line = sparkline([0, 2], [1.0, 100.0], 6, 0, 2)
    assert line[0] == "▁" and line[-2:] == "██" and " " not in line[:4]


def test_values_read_as_a_person_would() -> None:
    assert [fmt_value(v) for v in (None, "NaN", "Infinity", "-Infinity", 0.000123456, 3.0)] == \
        ["—", "NaN", "Infinity", "-Infinity", "0.0001235", "3"]
