"""A pinned ask tokenizes at most window x PINNED_CHARS_PER_TOKEN characters of documents, and names what it left
out past that bound."""

from __future__ import annotations

from app.context import ContextUnit, bound_pinned
from app.service import PINNED_CHARS_PER_TOKEN


def unit(path: str, text: str) -> ContextUnit:
    return ContextUnit("docs", path, 0, text, 1, max(1, len(text.splitlines())))


def test_bound_keeps_whole_units_then_cuts_one_at_a_line_and_leaves_the_rest():
    a, b, c = unit("a.md", "x" * 9 + "\n"), unit("b.md", "".join(f"{i:04d}\n" for i in range(10))), unit("c.md", "c\n")
    kept, left = bound_pinned([a, b, c], 10 + 5 * 4 + 3)
    assert [u.path for u in kept] == ["a.md", "b.md"] and kept[1].text == "0000\n0001\n0002\n0003\n"
    assert kept[1].end_line == 4
    assert left == ["b.md lines 5-10 (past the 33-character bound on pinned text)",
                    "c.md lines 1-1 (past the 33-character bound on pinned text)"]
    assert bound_pinned([a, b, c], 10_000) == ([a, b, c], [])
    kept, left = bound_pinned([unit("long.min.js", "y" * 100)], 50)  # one line longer than the bound
    assert kept == [] and left == ["long.min.js lines 1-1 (past the 50-character bound on pinned text)"]


def test_a_pinned_ask_on_a_large_collection_tokenizes_a_bounded_amount(make_service, tmp_path):
    from tiny import tiny_loaded_model

    model = tiny_loaded_model(window=512)
    service = make_service(model=model, max_new_tokens=16)
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "a.md").write_text("The cache keeps pages.\n" * 10)
    (folder / "b.md").write_text("".join(f"Line {i}: more text about pages of tokens.\n" for i in range(20_000)))
    (folder / "c.md").write_text("The last document.\n")
    service.ingest_paths("big", [str(folder)])
    bound = 512 * PINNED_CHARS_PER_TOKEN
    seen: list[int] = []
    encode_chat = model.tokenizer.encode_chat

    def counting(messages, *args, **kwargs):
        seen.append(sum(len(m["content"]) for m in messages))
        return encode_chat(messages, *args, **kwargs)

    model.tokenizer.encode_chat = counting
    try:
        result = service.ask("What does the cache keep?", "big", pinned=True)
    finally:
        model.tokenizer.encode_chat = encode_chat
    assert seen and max(seen) < bound + 2_000  # the documents' 860 KB never reached the tokenizer
    notes = [item for item in result.left_out if "character bound on pinned text" in item]
    assert notes[0].startswith("big/b.md lines ") and notes[1].startswith("big/c.md lines 1-1 (past the")
