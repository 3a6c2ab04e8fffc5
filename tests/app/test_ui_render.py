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
    assert '<td class="ln">3</td><td class="tx">x &lt; y</td>' in html and "[2] doc.md lines 1-40</summary>" in html
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
        "**3** factor pages · **3.0 MiB** on disk · hit rate **50%**")


def test_cache_panel_says_bytes_per_token_and_what_is_pinned():
    stats = {"entries": 105, "bytes": 980 * 1024**2, "hit_rate": 0.8, "tokens": 21_300,
             "bytes_per_token": 980 * 1024**2 / 21_300, "pinned_bytes": 849 * 1024**2, "budget_bytes": 4 * 1024**3}
    text = ui_render.cache_markdown(stats)
    assert "21,300 tokens cached, **47.1 KiB per token**" in text
    assert "849.0 MiB pinned by chat sessions" in text and "4.0 GiB budget" in text
    listing = ui_render.pinned_sessions_markdown(
        [{"session_id": "a", "name": "geography", "collection": "docs", "bytes": 2048, "tokens": 512}])
    assert listing == "- geography (docs): 2.0 KiB, 512 tokens"
    assert ui_render.pinned_sessions_markdown([]).startswith("None of your sessions")
    with_chunks = ui_render.cache_markdown({**stats, "chunk_caches": {"entries": 12, "bytes": 3 * 1024**2}})
    assert "12 of them chunk caches (3.0 MiB), for chunk reuse" in with_chunks
    assert "chunk caches" not in ui_render.cache_markdown({**stats, "chunk_caches": {"entries": 0, "bytes": 0}})


def test_cited_text_keeps_the_files_line_numbers():
    html = ui_render.source_text_html("def f():\n    return 1\n", first_line=41)
    assert html.count("<tr>") == 2 and '<td class="ln">41</td>' in html and '<td class="ln">42</td>' in html
    assert "    return 1" in html  # indentation kept; the stylesheet wraps long lines (pre-wrap)


def test_ttft_chart_has_whole_turns_points_bars_and_axis_titles():
    rows = [ui_render.TurnCost(1, 1021.0, 555, 0), ui_render.TurnCost(2, 755.0, 588, 566)]
    svg = ui_render.ttft_chart_html(rows)
    assert svg.count('class="ttft-point"') == 2
    assert 'data-turn="1"' in svg and 'data-turn="2"' in svg and 'data-turn="1.' not in svg
    assert ">TTFT (s)</text>" in svg and ">turn</text>" in svg and ">prompt tokens</text>" in svg
    assert 'class="bar-reused" data-turn="2" data-tokens="566"' in svg
    assert 'class="bar-prefilled" data-turn="2" data-tokens="22"' in svg
    assert "bar-reused" not in svg.split('data-turn="2"')[0]  # turn 1 reused nothing: no reused bar
    assert "Each turn of the session shows here" in ui_render.ttft_chart_html([])


def test_chart_axis_maxima_are_round_numbers():
    assert [ui_render._nice_ceiling(v) for v in (0.3, 1.12, 2.6, 7, 1234)] == [0.5, 2, 5, 10, 2000]
