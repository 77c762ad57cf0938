"""The fault-injection suite: each case breaks something real and records what raymix did.

Every test asserts the expected outcome and records one row (case, expected, observed) with
the ``fault`` fixture. With ``RAYMIX_FAULTS_TABLE=PATH`` set, the rows of the session are
written to PATH as the Markdown table that the README shows.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

# Test folders in what is recorded: /tmp/pytest-of-USER/pytest-N/test_name0 -> ...
_TMP = re.compile(r"\S*/pytest-\d+/[^/\s']+")
_ROWS: list[tuple[str, str, str, bool]] = []


@pytest.fixture
def fault() -> Callable[[str, str, str, bool], None]:
    """``fault(case, expected, observed, ok)``: one row of the table."""

    def record(case: str, expected: str, observed: str, ok: bool) -> None:
        _ROWS.append((case, expected, _TMP.sub("...", observed), ok))
        assert ok, f"{case}: expected {expected}, observed {observed}"

    return record


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("RAYMIX_FAULTS_TABLE")
    if not path or not _ROWS:
        return
    lines = ["| fault | expected | observed | |", "| --- | --- | --- | --- |"]
    lines += [f"| {c} | {e} | {o} | {'pass' if ok else 'FAIL'} |" for c, e, o, ok in _ROWS]
    Path(path).write_text("\n".join(lines) + "\n")
