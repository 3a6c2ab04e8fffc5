"""Pure functions that turn the service's results into what the web UI shows (markdown, chat messages, tables).

Kept apart from `app.ui` so they are tested without a browser and the UI module stays layout and wiring only.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from app.grounding import grounding_note

METRICS_CLASS = "tpa-metrics"


def metrics_line(metrics: dict) -> str:
    """One line under an answer: prompt and reused tokens, time to first token, decode speed, total time."""
    if not metrics:
        return ""
    prompt = int(metrics.get("prompt_tokens", 0))
    reused = int(metrics.get("reused_tokens", 0))
    share = f" ({100 * reused / prompt:.0f}%)" if prompt else ""
    line = (
        f"prompt {prompt:,} tokens · reused {reused:,}{share} · "
        f"TTFT {metrics.get('ttft_ms', 0):,.0f} ms · {metrics.get('decode_tokens_per_s', 0):.1f} tok/s · "
        f"total {metrics.get('total_ms', 0) / 1000:.2f} s"
    )
    note = grounding_note(metrics.get("ungrounded_terms") or [])
    return f"{line} · {note}" if note else line


def left_out_text(items: Sequence[str], limit: int = 8) -> str:
    """What was left out to fit the window, the first `limit` items named and the rest counted."""
    shown = "; ".join(items[:limit])
    return shown + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def answer_markdown(answer: str, metrics: dict | None = None, left_out: Sequence[str] = ()) -> str:
    """The assistant message: the answer, then (once done) what was left out and the metrics line."""
    parts = [answer if answer.strip() else "…"]
    if left_out:
        parts.append("*Left out to fit the model's window: " + html.escape(left_out_text(left_out)) + "*")
    if metrics:
        parts.append(f'<span class="{METRICS_CLASS}">{html.escape(metrics_line(metrics))}</span>')
    return "\n\n".join(parts)


def source_label(source: dict) -> str:
    """`path lines a-b (score 0.83)`; pinned documents have no score."""
    label = source["path"]
    if source.get("start_line") is not None:
        label += f" lines {source['start_line']}-{source['end_line']}"
    if source.get("score") is not None:
        label += f" (score {source['score']:.2f})"
    return label


def sources_markdown(sources: Sequence[dict]) -> str:
    """Citations, each expandable to its text (HTML details elements inside the chat message)."""
    blocks = []
    for number, source in enumerate(sources, start=1):
        text = html.escape(source.get("text", "").rstrip())
        blocks.append(
            f"<details><summary>[{source.get('ref', number)}] {html.escape(source_label(source))}</summary>\n\n"
            f"<pre>{text}</pre>\n\n</details>"
        )
    return "\n\n".join(blocks)


def turn_messages(question: str, answer: str, sources: Sequence[dict], metrics: dict | None,
                  left_out: Sequence[str] = ()) -> list[dict]:
    """The chat messages of one turn: the question, the answer with its metrics line, the citations."""
    messages = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer_markdown(answer, metrics, left_out)},
    ]
    if sources:
        messages.append(
            {
                "role": "assistant",
                "content": sources_markdown(sources),
                "metadata": {"title": f"Sources ({len(sources)})", "status": "done"},
            }
        )
    return messages


def session_label(info) -> str:  # noqa: ANN001 - app.sessions.SessionInfo
    name = info.name or "(new session)"
    return f"{name} · {info.n_turns} turn{'s' if info.n_turns != 1 else ''} · {info.updated_at:%Y-%m-%d %H:%M}"


def cache_markdown(stats: dict) -> str:
    """The cache panel's numbers."""
    if not stats:
        return "No cache statistics yet."
    entries = stats.get("entries", 0)
    size = stats.get("bytes", 0)
    rate = stats.get("hit_rate")
    rate_text = "n/a" if rate is None else f"{100 * rate:.0f}%"
    return f"**{entries:,}** cached pages · **{_human_bytes(size)}** on disk · hit rate **{rate_text}**"


def ingest_markdown(report: dict) -> str:
    """What was indexed and what was skipped, with the reason for each skipped file."""
    documents, skipped = report.get("documents", []), report.get("skipped", [])
    lines = [
        f"**{report.get('collection', '')}**: {len(documents)} file{'s' if len(documents) != 1 else ''} indexed, "
        f"{report.get('chunks_total', 0)} chunks, {len(skipped)} skipped ({report.get('seconds', 0):.1f} s)."
    ]
    if skipped:
        lines.append("")
        lines += [f"- skipped `{item['path']}`: {item['reason']}" for item in skipped]
    return "\n".join(lines)


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
