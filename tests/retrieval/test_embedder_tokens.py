"""The embedder's token counts (the usage of the OpenAI-compatible `/v1/embeddings`) on the packaged MiniLM."""

from __future__ import annotations


def test_count_tokens_with_special_tokens_and_without_the_cut(minilm):
    assert minilm.count_tokens(["hello world", "", "The cache keeps pages."]) == [4, 2, 7]  # [CLS] ... [SEP]
    assert minilm.max_tokens == 256
    assert minilm.count_tokens(["word " * 400]) == [402]  # counted whole: a caller can refuse what embed cuts
