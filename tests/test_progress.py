"""Progress: a bar on a terminal, a few log lines (no carriage returns) in a log file."""

from __future__ import annotations

import io
import logging

from mastar_vac import progress


def test_piped_stream_gets_log_lines_not_carriage_returns(monkeypatch, caplog):
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)  # the bar is off under pytest otherwise
    monkeypatch.setenv("MASTAR_VAC_PROGRESS", "1")
    stream = io.StringIO()  # not a terminal
    with caplog.at_level(logging.INFO, logger="mastar_vac.progress"):
        out = list(progress.progress_bar(range(1000), desc="fit", unit="block", stream=stream))
    assert out == list(range(1000))
    assert "\r" not in stream.getvalue() and stream.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records if r.name == "mastar_vac.progress"]
    assert 2 <= len(lines) <= 5 and lines[-1].startswith("fit: 1000/1000 block"), lines
