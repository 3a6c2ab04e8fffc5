"""The app in a real browser: headless Chromium (Debian's package) driven by Playwright, never a downloaded one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from browser_flow import CHROMIUM, run_flow

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

pytestmark = pytest.mark.browser


@pytest.fixture
def empty_app(make_service, serve_web):
    service = make_service(max_new_tokens=16)
    return serve_web(service), service


def test_upload_ask_cite_follow_up_in_chromium(empty_app, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian package 'chromium'; `make system-deps` installs it)")
    url, service = empty_app
    guide = tmp_path / "guide.md"
    guide.write_text("# The cache store\n\nThe store keys its entries by a chained sha256 over the namespace,\n"
                     "the parent key and the token ids of each page.\n")
    bad = tmp_path / "tool.exe"
    bad.write_bytes(b"MZ" * 64)
    huge = tmp_path / "huge.txt"
    huge.write_text("x" * (service.max_upload_bytes + 1))
    shot = ARTIFACTS / "browser-chat.png"
    flow = run_flow(url, shot, upload=[guide], bad_upload=bad, oversized=huge)

    assert service.collection_names() == ["guides"]
    assert any("tool.exe" in t and "unsupported file type .exe" in t for t in flow.toasts)
    assert any("exceed the maximum allowed size" in t for t in flow.toasts)
    assert re.match(r"\[1\] [0-9a-f]{10}/guide\.md lines 1-", flow.citation), flow.citation
    assert "chained sha256" in flow.citation_text
    assert len(flow.metrics) == 2
    (prompt1, reused1), (prompt2, reused2) = flow.metrics
    assert reused1 == 0 and prompt2 > prompt1
    assert reused2 > 0  # the follow-up restored the first turn's prefix from the cache
    sessions = service.sessions()
    assert len(sessions) == 1 and sessions[0].n_turns == 2  # the refused empty question changed nothing
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_sessions_resume_rename_new_delete_in_chromium(make_service, corpus_dir, serve_web):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian package 'chromium'; `make system-deps` installs it)")
    from browser_flow import CHROMIUM_ARGS, wait_for_toast
    from playwright.sync_api import sync_playwright

    from app.owners import OWNER_COOKIE

    service = make_service()
    service.ingest_paths("docs", [str(corpus_dir)])
    url = serve_web(service)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.goto(url)
        # Sessions this browser owns (its owner cookie), and one of another visitor that it must not list.
        token = next(c["value"] for c in page.context.cookies() if c["name"] == OWNER_COOKIE)
        first = service.ask("What is the capital of France?", "docs", owner=f"browser:{token}")
        second = service.ask("How does the cache store key its entries?", "docs", owner=f"browser:{token}")
        foreign = service.ask("What is the secret of the other visitor?", "docs", owner="browser:" + "x" * 43)
        page.reload()
        page.wait_for_selector("#question textarea", timeout=30_000)
        # Resume: the chat shows that session's turn, and not the other session's.
        page.click("#sessions input")
        page.locator("#sessions ul li", has_text="capital of France").first.wait_for()
        assert "other visitor" not in page.inner_text("#sessions")
        page.locator("#sessions ul li", has_text="capital of France").first.click()
        page.wait_for_function("document.querySelector('#chat').innerText.includes('capital of France')")
        assert "cache store" not in page.inner_text("#chat")
        # Rename it.
        page.fill("#rename textarea", "geography")
        page.press("#rename textarea", "Enter")
        page.wait_for_function("document.querySelector('#sessions input').value.startsWith('geography')")
        # New: an empty chat; the next question starts a third session.
        page.click("#new-session")
        page.wait_for_function("!document.querySelector('#chat').innerText.includes('capital of France')")
        # Resume the other one and delete it.
        page.click("#sessions input")
        page.locator("#sessions ul li", has_text="cache store").first.click()
        page.wait_for_function("document.querySelector('#chat').innerText.includes('cache store')")
        page.click("#delete-session")
        wait_for_toast(page, "session deleted", 30_000)
        browser.close()
    assert service.session(first.session_id)[0].name == "geography"
    assert [s.id for s in service.sessions()] == [foreign.session_id, first.session_id]
    assert second.session_id not in {s.id for s in service.sessions()}


def test_the_page_reads_right_in_chromium(make_service, serve_web, tmp_path):
    """What a person sees (each check failed before its fix): a true empty state, one progress bar during an
    ingest, a refused question that leaves no component in an error state, a chart of whole turns with its
    points and axis titles, cited text that wraps with its file's line numbers, no label over the chat."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian package 'chromium'; `make system-deps` installs it)")
    from browser_flow import (
        CHART_JS,
        CHROMIUM_ARGS,
        ERROR_STATES_JS,
        LABEL_OVERLAP_JS,
        PROGRESS_JS,
        SOURCE_JS,
        ask,
        chat_placeholder,
        wait_for_toast,
    )
    from playwright.sync_api import sync_playwright
    from tiny import SlowEmbedder

    service = make_service(embedder=SlowEmbedder(delay_s=0.4), max_new_tokens=8)
    files = []
    for i in range(3):
        doc = tmp_path / f"store{i}.md"
        doc.write_text(f"# Store part {i}\n\nThe store keys its entries by a chained sha256 over the namespace.\n"
                       + "A long line of the design that a reader must be able to read to its end " * 8 + "\n")
        files.append(str(doc))
    url = serve_web(service)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.goto(url)
        page.wait_for_selector("#question textarea", timeout=30_000)
        assert chat_placeholder(page).startswith("No collection yet")

        page.fill("#new-collection textarea", "guides")
        page.set_input_files("#upload input[type=file]", files)
        page.wait_for_function("document.querySelectorAll('#upload tbody tr').length >= 3", timeout=30_000)
        page.click("#ingest")
        showing = set()
        while not page.locator("#ingest-summary :text('indexed')").count():
            trackers = page.evaluate(PROGRESS_JS)
            assert len(trackers) <= 1, f"several progress overlays at once: {trackers}"
            showing.update(trackers)
            page.wait_for_timeout(100)
        assert showing <= {"ingest-summary"}, showing
        page.wait_for_function("document.querySelector('#collection input').value === 'guides'")
        page.wait_for_timeout(500)
        assert chat_placeholder(page).startswith("Ask a question about guides")

        page.click("#ask")
        wait_for_toast(page, "the question is empty", 30_000)
        assert page.evaluate(ERROR_STATES_JS) == []
        ask(page, "How does the store key its entries?", 1, 60_000)
        ask(page, "And what is the namespace?", 2, 60_000)
        assert page.evaluate(ERROR_STATES_JS) == []
        page.wait_for_function("document.querySelectorAll('#ttft-plot circle.ttft-point').length === 2")
        chart = page.evaluate(CHART_JS)
        assert chart["turns"] == ["1", "2"] and chart["labels"] == ["1", "2"] and all(chart["visible"])
        assert set(chart["titles"]) == {"TTFT (s)", "prompt tokens", "turn"}
        assert chart["reused"] and chart["reused"][-1] > 0  # the follow-up's reused tokens are drawn
        page.screenshot(path=str(ARTIFACTS / "ui-two-turns.png"), full_page=True)

        page.locator("#chat .thought-group .title:has-text('Sources')").first.click()
        page.locator("#chat details summary").first.click()
        page.wait_for_selector("#chat details[open] .tpa-source")
        source = page.evaluate(SOURCE_JS)
        assert source["clipped"] == 0 and source["first_line"] == "1" and source["width"] > 100
        assert page.evaluate(LABEL_OVERLAP_JS) == 0
        page.locator("#chat details[open]").first.scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "ui-source-expanded.png"), full_page=True)
        browser.close()
