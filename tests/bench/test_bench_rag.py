"""Benchmark 6 (RAG) runs end to end at a tiny size and writes its section; no timing is
asserted, only what the run must have done (the incremental re-index embeds only the edited
documents, every query finds its passages)."""

from __future__ import annotations

from pathlib import Path


def test_rag_benchmark_runs_and_writes_its_section(tmp_path: Path) -> None:
    from bench import rag
    from bench.__main__ import HEADER, write_section

    result = rag.run(documents=4, edited=1, queries=3, embed_sample=2, log=lambda _: None)
    first, incremental, full = result["first"], result["incremental"], result["full"]
    assert first["documents_added"] == 4 and first["chunks_added"] == result["chunks"] > 4
    assert incremental["documents_changed"] == 1 and incremental["documents_kept"] == 3
    assert 0 < incremental["chunks_added"] < full["chunks_added"] == result["chunks"]
    assert full["full"] is True and full["documents_changed"] == 4
    assert len(result["latencies"]) == 3 and len(result["filtered"]) == 1

    out = tmp_path / "BENCHMARKS.md"
    out.write_text(HEADER)
    write_section(6, rag.markdown(result, "python -m bench --only 6"), out)
    text = out.read_text()
    assert "<!-- bench:6 -->" in text and "## 6. RAG: indexing throughput and retrieval latency" in text
    assert "chunks/s" in text and "p95" in text and "incremental" in text
