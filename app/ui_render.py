"""Pure functions that turn the service's results into what the web UI shows (markdown, chat messages, tables).

Kept apart from `app.ui` so they are tested without a browser and the UI module stays layout and wiring only.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import NamedTuple

METRICS_CLASS = "tpa-metrics"
SOURCE_CLASS = "tpa-source"
CHART_ID = "ttft-chart"


class TurnCost(NamedTuple):
    """What one turn of a session cost: the cache panel's chart plots these."""

    turn: int  # 1, 2, ... in the session
    ttft_ms: float
    prompt_tokens: int
    reused_tokens: int  # restored from the cache instead of prefilled


def metrics_line(metrics: dict) -> str:
    """One line under an answer: prompt tokens, those reused from exact prefix pages (and, with chunk reuse, those
    from chunk caches and those recomputed), time to first token, decode speed, total time."""
    if not metrics:
        return ""
    prompt = int(metrics.get("prompt_tokens", 0))
    reused = int(metrics.get("reused_tokens", 0))
    share = f" ({100 * reused / prompt:.0f}%)" if prompt else ""
    chunks = int(metrics.get("chunk_tokens", 0))
    recomputed = int(metrics.get("recomputed_tokens", 0))
    assembled = f"chunk caches {chunks:,} · recomputed {recomputed:,} · " if chunks or recomputed else ""
    return (
        f"prompt {prompt:,} tokens · reused {reused:,}{share} · {assembled}"
        f"TTFT {metrics.get('ttft_ms', 0):,.0f} ms · {metrics.get('decode_tokens_per_s', 0):.1f} tok/s · "
        f"total {metrics.get('total_ms', 0) / 1000:.2f} s"
    )


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


def source_text_html(text: str, first_line: int | None) -> str:
    """A cited text with the file's line numbers beside it; long lines wrap instead of running off the page."""
    lines = text.rstrip().split("\n")
    start = first_line if first_line is not None else 1
    rows = "".join(f'<tr><td class="ln">{start + i}</td><td class="tx">{html.escape(line) or " "}</td></tr>'
                   for i, line in enumerate(lines))
    return f'<table class="{SOURCE_CLASS}"><tbody>{rows}</tbody></table>'


def sources_markdown(sources: Sequence[dict]) -> str:
    """Citations, each expandable to its text (HTML details elements inside the chat message)."""
    blocks = []
    for number, source in enumerate(sources, start=1):
        text = source_text_html(source.get("text", ""), source.get("start_line"))
        blocks.append(
            f"<details><summary>[{source.get('ref', number)}] {html.escape(source_label(source))}</summary>\n\n"
            f"{text}\n\n</details>"
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


def session_label(info) -> str:  # app.sessions.SessionInfo
    name = info.name or "(new session)"
    return f"{name} · {info.n_turns} turn{'s' if info.n_turns != 1 else ''} · {info.updated_at:%Y-%m-%d %H:%M}"


def cache_markdown(stats: dict) -> str:
    """The cache panel's numbers, in words: pages and bytes, bytes per token, what is pinned, the hit rate."""
    if not stats:
        return "No cache statistics yet."
    entries = stats.get("entries", 0)
    size = stats.get("bytes", 0)
    rate = stats.get("hit_rate")
    rate_text = "n/a" if rate is None else f"{100 * rate:.0f}%"
    lines = [f"**{entries:,}** factor pages · **{human_bytes(size)}** on disk · hit rate **{rate_text}**"]
    chunks = stats.get("chunk_caches") or {}
    if chunks.get("entries"):
        lines.append(f"{chunks['entries']:,} of them chunk caches ({human_bytes(chunks.get('bytes', 0))}), for "
                     "chunk reuse")
    per_token = stats.get("bytes_per_token")
    if per_token:
        lines.append(f"{stats.get('tokens', 0):,} tokens cached, **{human_bytes(round(per_token))} per token** "
                     "(every layer's factors)")
    pinned = stats.get("pinned_bytes", 0)
    if pinned:
        budget = stats.get("budget_bytes")
        budget_text = f" of a {human_bytes(budget)} budget" if budget else ""
        lines.append(f"{human_bytes(pinned)} pinned by chat sessions (kept until unpinned or deleted){budget_text}"
                     "; the rest is evicted oldest first when space runs out.")
    return "  \n".join(lines)


def pinned_sessions_markdown(sessions: Sequence[dict]) -> str:
    """Which of the visitor's sessions hold cache space, largest first."""
    if not sessions:
        return "None of your sessions pins cache pages."
    rows = [f"- {html.escape(s['name'] or '(unnamed)')} ({html.escape(s['collection'])}): "
            f"{human_bytes(s['bytes'])}, {s['tokens']:,} tokens" for s in sessions[:12]]
    if len(sessions) > 12:
        rows.append(f"- and {len(sessions) - 12} more")
    return "\n".join(rows)


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
    if report.get("encode"):
        enc = report["encode"]
        lines += ["", f"Chunk caches: {enc['encoded']} encoded, {enc['cached']} already stored"
                  + (f", {enc['rejected']} refused by the cache budget" if enc["rejected"] else "") + "."]
    return "\n".join(lines)


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


# ----- the cache panel's chart: time to first token and reused vs prefilled tokens, per turn ---------------------
_W, _LEFT, _RIGHT = 300, 46, 10  # svg width and the plot's horizontal margins, px
_TTFT_TOP, _TTFT_H = 26, 86  # top panel: time to first token
_TOK_TOP, _TOK_H = 146, 70  # bottom panel: prompt tokens, reused and prefilled stacked
_H = 262
REUSED_COLOR, PREFILLED_COLOR, LINE_COLOR = "#2f9e6e", "#e8a23a", "#4f5bd5"


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= value (axis maxima people read at a glance)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= value)


def _tokens_label(n: float) -> str:
    return f"{n / 1000:g}k" if n >= 1000 else f"{n:g}"


def ttft_chart_html(rows: Sequence[TurnCost]) -> str:
    """An inline SVG chart of a session's turns: time to first token (points joined by a line, seconds) above
    the prompt's tokens as stacked bars (reused from the cache, prefilled), on one axis of whole turn numbers."""
    if not rows:
        return (f'<div id="{CHART_ID}" class="tpa-chart-empty">Each turn of the session shows here: its time to '
                "first token, and how much of its prompt came from the cache.</div>")
    n = len(rows)
    band = (_W - _LEFT - _RIGHT) / n
    x_of = [_LEFT + (i + 0.5) * band for i in range(n)]
    ttft_max = _nice_ceiling(max(r.ttft_ms for r in rows) / 1000 * 1.1)
    tokens_max = _nice_ceiling(max(max(r.prompt_tokens, r.reused_tokens) for r in rows))
    step = max(1, math.ceil(n / 12))  # at most ~12 turn labels

    def y_ttft(seconds: float) -> float:
        return _TTFT_TOP + _TTFT_H * (1 - seconds / ttft_max)

    def y_tok(tokens: float) -> float:
        return _TOK_TOP + _TOK_H * (1 - tokens / tokens_max)

    parts = [f'<svg id="{CHART_ID}" viewBox="0 0 {_W} {_H}" width="100%" role="img" '
             f'aria-label="time to first token and reused tokens per turn" xmlns="http://www.w3.org/2000/svg" '
             f'font-family="sans-serif" font-size="10">']
    for top, height, ticks in ((_TTFT_TOP, _TTFT_H, [(y_ttft(v), f"{v:g}") for v in (0, ttft_max / 2, ttft_max)]),
                               (_TOK_TOP, _TOK_H, [(y_tok(v), _tokens_label(v)) for v in (0, tokens_max / 2,
                                                                                            tokens_max)])):
        for y, label in ticks:
            parts.append(f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                         f'<text x="{_LEFT - 4}" y="{y + 3:.1f}" text-anchor="end" fill="#555">{label}</text>')
        parts.append(f'<line x1="{_LEFT}" x2="{_LEFT}" y1="{top}" y2="{top + height}" stroke="#999"/>')
    parts.append(f'<text class="axis-title" x="12" y="{_TTFT_TOP + _TTFT_H / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {_TTFT_TOP + _TTFT_H / 2})" fill="#333">TTFT (s)</text>')
    parts.append(f'<text class="axis-title" x="12" y="{_TOK_TOP + _TOK_H / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {_TOK_TOP + _TOK_H / 2})" fill="#333">prompt tokens</text>')
    parts.append(f'<text class="chart-title" x="{_LEFT}" y="14" fill="#222" font-size="11" font-weight="600">'
                 "Time to first token per turn</text>")
    points = " ".join(f"{x:.1f},{y_ttft(r.ttft_ms / 1000):.1f}" for x, r in zip(x_of, rows))
    parts.append(f'<polyline points="{points}" fill="none" stroke="{LINE_COLOR}" stroke-width="2"/>')
    bar_w = min(28.0, band * 0.6)
    for x, r in zip(x_of, rows):
        seconds = r.ttft_ms / 1000
        reused = min(r.reused_tokens, r.prompt_tokens)
        prefilled = r.prompt_tokens - reused
        tip = (f"turn {r.turn}: TTFT {seconds:.2f} s; prompt {r.prompt_tokens:,} tokens, {reused:,} reused, "
               f"{prefilled:,} prefilled")
        parts.append(f'<circle class="ttft-point" data-turn="{r.turn}" data-ttft-s="{seconds:.3f}" cx="{x:.1f}" '
                     f'cy="{y_ttft(seconds):.1f}" r="4" fill="{LINE_COLOR}"><title>{tip}</title></circle>')
        for value, base, color, kind in ((reused, 0, REUSED_COLOR, "reused"),
                                         (prefilled, reused, PREFILLED_COLOR, "prefilled")):
            if value:
                top, bottom = y_tok(base + value), y_tok(base)
                parts.append(f'<rect class="bar-{kind}" data-turn="{r.turn}" data-tokens="{value}" '
                             f'x="{x - bar_w / 2:.1f}" y="{top:.1f}" width="{bar_w:.1f}" '
                             f'height="{bottom - top:.1f}" fill="{color}"><title>{tip}</title></rect>')
    for i in range(0, n, step):
        parts.append(f'<text class="turn-label" x="{x_of[i]:.1f}" y="{_TOK_TOP + _TOK_H + 13}" '
                     f'text-anchor="middle" fill="#555">{rows[i].turn}</text>')
    parts.append(f'<text class="axis-title" x="{(_LEFT + _W - _RIGHT) / 2}" y="{_TOK_TOP + _TOK_H + 27}" '
                 'text-anchor="middle" fill="#333">turn</text>')
    legend_y = _TOK_TOP - 12
    for offset, color, label in ((0, REUSED_COLOR, "reused"), (70, PREFILLED_COLOR, "prefilled")):
        parts.append(f'<rect x="{_LEFT + offset}" y="{legend_y - 8}" width="9" height="9" fill="{color}"/>'
                     f'<text x="{_LEFT + offset + 13}" y="{legend_y}" fill="#333">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)
