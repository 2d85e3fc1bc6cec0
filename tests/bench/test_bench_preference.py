"""Benchmark 8 (preference training, reference log-probs once vs every step) runs at a tiny size
and writes its section; no timing is asserted, only what the run must have shown: both variants
trained the same steps to the same result."""

from __future__ import annotations

from pathlib import Path


def test_preference_benchmark_runs_and_writes_its_section(tmp_path: Path) -> None:
    from bench import preference
    from bench.__main__ import HEADER, write_section

    result = preference.run(pairs=8, epochs=1, model_size=(64, 2), log=lambda _: None)
    once, every = result["results"]["once"], result["results"]["every"]
    assert once["steps"] == every["steps"] > 0 and once["train_pairs"] == every["train_pairs"] > 0
    assert abs(once["metrics"]["train_loss"] - every["metrics"]["train_loss"]) < 1e-4
    assert result["weight_difference"] < 1e-4
    assert once["peak_rss_mib"] > 0 and every["peak_rss_mib"] > 0

    out = tmp_path / "BENCHMARKS.md"
    out.write_text(HEADER)
    write_section(8, preference.markdown(result, "python -m bench --only 8"), out)
    text = out.read_text()
    assert "<!-- bench:8 -->" in text and "## 8. Preference training" in text and "once per job" in text
