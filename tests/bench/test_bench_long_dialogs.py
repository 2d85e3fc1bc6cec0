"""Benchmark 7 (long conversations) runs at a tiny size and writes its section; no timing is
asserted, only what the run must have done (windows train every assistant token, truncation
fewer, no window over max_seq_length)."""

from __future__ import annotations

from pathlib import Path


def test_long_dialog_benchmark_runs_and_writes_its_section(tmp_path: Path) -> None:
    from bench import long_dialogs
    from bench.__main__ import HEADER, write_section

    result = long_dialogs.run(sizes=(30,), short_chats=5, log=lambda _: None)
    (row,) = result["rows"]
    assert row["tokens"] > result["max_seq_length"] and row["windows"] >= 2
    assert row["windowed_trained"] == row["assistant_tokens"] > row["truncated_trained"] > 0
    assert row["longest"] <= result["max_seq_length"]
    assert result["short"]["chats"] == 5 and result["short"]["build"] > 0

    out = tmp_path / "BENCHMARKS.md"
    out.write_text(HEADER)
    write_section(7, long_dialogs.markdown(result, "python -m bench --only 7"), out)
    text = out.read_text()
    assert "<!-- bench:7 -->" in text and "## 7. Long conversations" in text and "(100%)" in text
