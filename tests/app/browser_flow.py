"""A person's session in a real browser (headless Chromium from Debian, driven by Playwright): create a collection
by upload, ask, read the streamed answer and its citation, ask a follow-up, see the reused tokens, screenshot.

Used by test_browser.py against an app on the tiny model, and runnable against a real `tpa-rag serve` to take
the README's screenshot:  python tests/app/browser_flow.py http://127.0.0.1:7860 docs/screenshot.png
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
METRICS = re.compile(r"prompt ([\d,]+) tokens · reused ([\d,]+)")


@dataclass
class FlowResult:
    answers: list[str] = field(default_factory=list)
    metrics: list[tuple[int, int]] = field(default_factory=list)  # (prompt tokens, reused tokens) per answer
    citation: str = ""
    citation_text: str = ""
    toasts: list[str] = field(default_factory=list)


def toasts(page) -> list[str]:
    return [t.strip() for t in page.locator("[data-testid='toast-body']").all_inner_texts()]


def wait_for_toast(page, text: str, timeout_ms: int) -> str:
    """Wait until a notification containing `text` shows (they fade after a while: read them when they come)."""
    selector = "[data-testid='toast-body']"
    page.wait_for_function(
        f"[...document.querySelectorAll({selector!r})].some(t => t.innerText.includes({text!r}))",
        timeout=timeout_ms)
    return next(t for t in toasts(page) if text in t)


def wait_for_answers(page, n: int, timeout_ms: int) -> None:
    page.wait_for_function(f"document.querySelectorAll('#chat .tpa-metrics').length >= {n}", timeout=timeout_ms)


def ask(page, question: str, n_answers: int, timeout_ms: int) -> None:
    page.fill("#question textarea", question)
    page.click("#ask")
    wait_for_answers(page, n_answers, timeout_ms)


def run_flow(url: str, screenshot: Path, *, upload: list[Path] | None = None, collection: str = "guides",
             questions: tuple[str, str] = ("How does the cache store key its entries?",
                                           "And what goes into the namespace?"),
             bad_upload: Path | None = None, oversized: Path | None = None, timeout_ms: int = 60_000
             ) -> FlowResult:
    """Drive the page at `url`; with `upload`, first create `collection` from those files (and `bad_upload`)."""
    from playwright.sync_api import sync_playwright

    result = FlowResult()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#question textarea", timeout=timeout_ms)
            if oversized:  # refused by the upload itself, with the size limit in the message
                page.set_input_files("#upload input[type=file]", [str(oversized)])
                result.toasts.append(wait_for_toast(page, "exceed the maximum allowed size", timeout_ms))
            if upload:
                page.fill("#new-collection textarea", collection)
                files = [str(f) for f in upload] + ([str(bad_upload)] if bad_upload else [])
                page.set_input_files("#upload input[type=file]", files)
                page.wait_for_function(
                    f"document.querySelectorAll('#upload .file-preview tr, #upload tbody tr').length >= {len(files)}",
                    timeout=timeout_ms)
                page.click("#ingest")
                page.wait_for_selector("#ingest-summary :text('indexed')", timeout=timeout_ms)
                if bad_upload:
                    result.toasts.append(wait_for_toast(page, bad_upload.name, timeout_ms))
                # The question box is empty: asking must be refused with a message, the chat left as it was.
                page.click("#ask")
                result.toasts.append(wait_for_toast(page, "the question is empty", timeout_ms))
            else:
                page.wait_for_function("document.querySelector('#collection input').value.length > 0",
                                       timeout=timeout_ms)
            ask(page, questions[0], 1, timeout_ms)
            # The citation: expand the sources of the answer and read the first one.
            page.locator("#chat .thought-group .title:has-text('Sources')").first.click()
            summary = page.locator("#chat details summary").first
            summary.wait_for(timeout=timeout_ms)
            result.citation = summary.inner_text().strip()
            summary.click()
            result.citation_text = page.locator("#chat details .tpa-source").first.inner_text()
            ask(page, questions[1], 2, timeout_ms)
            for line in page.locator("#chat .tpa-metrics").all_inner_texts():
                m = METRICS.search(line)
                if m:
                    result.metrics.append((int(m[1].replace(",", "")), int(m[2].replace(",", ""))))
            result.answers = page.locator("#chat .message-row.bot-row, #chat [data-testid='bot']").all_inner_texts()
            for close in page.locator("[data-testid='toast-close']").all():
                if close.is_visible():
                    close.click()
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.evaluate("""() => document.querySelectorAll('#chat *').forEach(el => {
                if (el.scrollHeight > el.clientHeight + 4) el.scrollTop = el.scrollHeight; })""")
            page.wait_for_timeout(500)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return result


# ----- what a person sees: probes of the page's state ------------------------------------------------------------
ERROR_STATES_JS = """() => [...document.querySelectorAll('.error')]
    .filter(e => !e.closest('[data-testid^="toast"]') && !e.className.includes('toast') && e.offsetParent !== null)
    .map(e => ((e.closest('[id]') || {}).id || '?') + ': ' + e.innerText.trim())"""

# Status trackers (Gradio's progress overlays) that are showing, by the id of their component.
PROGRESS_JS = """() => [...document.querySelectorAll('.wrap.full, .wrap.minimal')]
    .filter(e => !e.classList.contains('hide') && e.offsetParent !== null)
    .map(e => (e.closest('[id]') || {}).id || '?')"""

CHART_JS = """() => {
    const svg = document.querySelector('#ttft-plot svg');
    if (!svg) return null;
    const box = svg.getBoundingClientRect();
    const inside = r => r.width > 0 && r.height > 0 && r.left >= box.left - 1 && r.right <= box.right + 1
        && r.top >= box.top - 1 && r.bottom <= box.bottom + 1;
    return {
        turns: [...svg.querySelectorAll('circle.ttft-point')].map(c => c.getAttribute('data-turn')),
        visible: [...svg.querySelectorAll('circle.ttft-point')].map(c => inside(c.getBoundingClientRect())),
        titles: [...svg.querySelectorAll('text.axis-title')].map(t => t.textContent),
        labels: [...svg.querySelectorAll('text.turn-label')].map(t => t.textContent),
        reused: [...svg.querySelectorAll('rect.bar-reused')].map(r => +r.getAttribute('data-tokens')),
    };
}"""

# An expanded citation: is any of its text cut off on the right, and which file line does it start at?
SOURCE_JS = """() => {
    const table = document.querySelector('#chat details[open] .tpa-source');
    if (!table) return null;
    const clipped = [table, ...table.querySelectorAll('td')].concat([table.parentElement])
        .filter(e => e.scrollWidth > e.clientWidth + 1).length;
    return {clipped, first_line: table.querySelector('td.ln').innerText.trim(), width: table.clientWidth};
}"""

# Block labels inside the chat drawn over its scrolling conversation area (a floating label that the messages
# scroll under).
LABEL_OVERLAP_JS = """() => {
    const labels = [...document.querySelectorAll('#chat [data-testid="block-label"], #chat label')]
        .filter(l => l.offsetParent !== null).map(l => l.getBoundingClientRect());
    const scrollers = [...document.querySelectorAll('#chat *')]
        .filter(e => ['auto', 'scroll'].includes(getComputedStyle(e).overflowY))
        .map(e => e.getBoundingClientRect()).filter(r => r.width > 0 && r.height > 0);
    return labels.filter(a => scrollers.some(b => a.left < b.right && b.left < a.right && a.top < b.bottom
        && b.top < a.bottom)).length;
}"""


def chat_placeholder(page) -> str:
    return page.locator("#chat .placeholder, #chat [class*='placeholder']").first.inner_text().strip()


if __name__ == "__main__":
    flow = run_flow(sys.argv[1], Path(sys.argv[2]), timeout_ms=600_000)  # a real model on a CPU takes its time
    print(flow)
