"""What the web UI shows for a result: the metrics line, citations, what was left out."""

from __future__ import annotations

from app import ui_render


def test_metrics_line_and_answer():
    metrics = {"prompt_tokens": 1929, "reused_tokens": 1792, "ttft_ms": 868.4, "decode_tokens_per_s": 12.81,
               "total_ms": 9660}
    line = ui_render.metrics_line(metrics)
    assert line == "prompt 1,929 tokens · reused 1,792 (93%) · TTFT 868 ms · 12.8 tok/s · total 9.66 s"
    text = ui_render.answer_markdown("The answer <b>", metrics, ["a.md lines 3-9"])
    assert text.startswith("The answer <b>")  # the chatbot sanitizes the answer itself
    assert 'class="tpa-metrics"' in text and "Left out to fit the model's window: a.md lines 3-9" in text
    assert ui_render.answer_markdown("", None) == "…"


def test_sources_are_expandable_and_escaped():
    sources = [{"path": "a<b>.py", "start_line": 3, "end_line": 9, "score": 0.8312, "text": "x < y", "ref": 4},
               {"path": "doc.md", "start_line": 1, "end_line": 40, "score": None, "text": "whole"}]
    html = ui_render.sources_markdown(sources)
    assert "<summary>[4] a&lt;b&gt;.py lines 3-9 (score 0.83)</summary>" in html
    assert "<pre>x &lt; y</pre>" in html and "[2] doc.md lines 1-40</summary>" in html
    messages = ui_render.turn_messages("q?", "a", sources, {"prompt_tokens": 1})
    assert [m["role"] for m in messages] == ["user", "assistant", "assistant"]
    assert messages[2]["metadata"]["title"] == "Sources (2)"


def test_left_out_is_summarized_after_a_few_items():
    items = [f"f{i}.py lines 1-9" for i in range(20)]
    text = ui_render.left_out_text(items)
    assert text.count("f") == 8 and text.endswith("; and 12 more")
    assert ui_render.left_out_text(items[:2]) == "f0.py lines 1-9; f1.py lines 1-9"


def test_ingest_summary_lists_skipped_files_with_reasons():
    report = {"collection": "docs", "documents": [{"path": "a.md", "chunks": 2}], "chunks_total": 2,
              "skipped": [{"path": "x.exe", "reason": "unsupported file type .exe"}], "seconds": 0.4}
    text = ui_render.ingest_markdown(report)
    assert text.startswith("**docs**: 1 file indexed, 2 chunks, 1 skipped (0.4 s).")
    assert "- skipped `x.exe`: unsupported file type .exe" in text
    assert ui_render.cache_markdown({"entries": 3, "bytes": 3 * 1024**2, "hit_rate": 0.5}) == (
        "**3** cached pages · **3.0 MiB** on disk · hit rate **50%**")
