"""`app.spellings.AnswerSpellings`: generated answers' token ids found again by their exact text, bounded."""

from __future__ import annotations

import time

from app.database import make_engine
from app.spellings import AnswerSpellings


def test_record_find_and_prune(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    spellings = AnswerSpellings(engine, max_rows=3)
    context = [{"collection": "docs", "path": "a.md", "chunk_index": 0, "text": "A"}]
    spellings.record("ns1", "Paris.", [5, 6], context=context)
    spellings.record("ns1", "Berlin.", [7])
    found = spellings.find("ns1", ["Paris.", "Berlin.", "Rome.", ""])
    assert {text: s.token_ids for text, s in found.items()} == {"Paris.": [5, 6], "Berlin.": [7]}
    assert found["Paris."].context == context and found["Berlin."].context == []
    assert spellings.find("ns2", ["Paris."]) == {}  # another model's namespace
    assert spellings.find("ns1", ["Paris. "]) == {}  # an edited text is not ours
    spellings.record("ns1", "Paris.", [8])  # generated again, spelled otherwise: the latest spelling counts
    assert spellings.find("ns1", ["Paris."])["Paris."].token_ids == [8]
    spellings.record("ns1", "", [1])  # nothing to remember
    spellings.record("ns1", "Madrid.", [])

    for i in range(5):  # max_rows 3: the least recently used records go
        time.sleep(0.01)
        spellings.record("ns1", f"answer {i}", [i + 1])
    time.sleep(0.01)
    assert set(spellings.find("ns1", ["Paris.", "answer 1", "answer 2"])) == {"answer 2"}  # now the most recent
    time.sleep(0.01)
    spellings.record("ns1", "answer 5", [6])
    assert set(spellings.find("ns1", ["Paris.", "Berlin."] + [f"answer {i}" for i in range(6)])) == {
        "answer 2", "answer 4", "answer 5"}
    engine.dispose()
