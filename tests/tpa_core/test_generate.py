"""Generation: greedy and seeded sampling, top-k/top-p, stop tokens and strings, UTF-8-safe deltas, cached prefixes."""

from __future__ import annotations

import collections

import pytest
import torch

from tpa_core.errors import TPAError
from tpa_core.generate import (
    CONTRAST_PLAUSIBLE,
    GenerationConfig,
    StopStringFilter,
    TextStream,
    contrast_logits,
    generate,
    prefill,
    sample_token,
)

EOS = 256


class ByteTokenizer:
    """Token i < 256 is the byte i; 256 is EOS. Multi-byte characters always span several tokens."""

    eos_token_ids = [EOS]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class PieceTokenizer:
    """Tokens are arbitrary byte strings, so one token can end inside a character and the next finish it."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.eos_token_ids: list[int] = []

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def _model(helpers, form="fixed", **overrides):
    config = helpers.tiny_config(form, vocab_size=257, **overrides)
    return helpers.random_model(config, seed=11)


def _run(model, prompt, tokenizer=None, cache=None, **cfg):
    events = list(generate(model, tokenizer or ByteTokenizer(), prompt, GenerationConfig(**cfg), cache=cache))
    ids = [t for e in events for t in e.token_ids]
    text = "".join(e.text for e in events)
    assert all(e.finish_reason is None for e in events[:-1]) and events[-1].done
    return ids, text, events[-1]


PROMPT = list(b"Tensor product attention ")


def test_greedy_is_deterministic_and_equals_argmax_of_full_forward(helpers, form):
    model = _model(helpers, form)
    ids, text, last = _run(model, PROMPT, max_new_tokens=12, stop_token_ids=())
    again, _, _ = _run(model, PROMPT, max_new_tokens=12)
    assert ids == again
    seq = list(PROMPT)
    with torch.inference_mode():
        for _ in range(len(ids)):
            nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
            seq.append(nxt)
            if nxt == EOS:
                break
    assert ids == seq[len(PROMPT):]
    assert last.finish_reason == ("eos" if ids[-1] == EOS else "length")


def test_seeded_sampling_is_reproducible(helpers):
    model = _model(helpers)
    a, _, _ = _run(model, PROMPT, max_new_tokens=16, temperature=1.3, top_k=50, top_p=0.95, seed=7)
    b, _, _ = _run(model, PROMPT, max_new_tokens=16, temperature=1.3, top_k=50, top_p=0.95, seed=7)
    c, _, _ = _run(model, PROMPT, max_new_tokens=16, temperature=1.3, top_k=50, top_p=0.95, seed=8)
    greedy, _, _ = _run(model, PROMPT, max_new_tokens=16)
    assert a == b
    assert a != c or a != greedy  # different seeds (or greedy) give another continuation


def test_top_k_and_top_p_are_respected():
    logits = torch.tensor([4.0, 3.5, 3.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    gen = torch.Generator().manual_seed(0)
    draws = [sample_token(logits, GenerationConfig(temperature=1.0, top_k=3), gen) for _ in range(3000)]
    counts = collections.Counter(draws)
    assert set(counts) == {0, 1, 2}
    probs = torch.softmax(logits[:3], 0)
    for token in range(3):
        assert abs(counts[token] / 3000 - probs[token].item()) < 0.04
    # top_p = 0.8: softmax probs are .45 .27 .17 .02...: tokens 0, 1 reach .72 < .8, so token 2 is also kept.
    draws = {sample_token(logits, GenerationConfig(temperature=1.0, top_p=0.8), gen) for _ in range(3000)}
    assert draws == {0, 1, 2}
    draws = {sample_token(logits, GenerationConfig(temperature=1.0, top_p=0.3), gen) for _ in range(300)}
    assert draws == {0}
    draws = {sample_token(logits, GenerationConfig(temperature=1.0, top_k=5, top_p=0.8), gen) for _ in range(3000)}
    assert draws == {0, 1, 2}
    assert sample_token(logits, GenerationConfig(temperature=0.7, top_k=1), gen) == 0
    everything = {sample_token(logits, GenerationConfig(temperature=5.0), gen) for _ in range(3000)}
    assert everything == set(range(8))


def test_text_stream_never_splits_a_character():
    text = "héllo €uro 😀 日本 done"
    stream = TextStream(ByteTokenizer())
    deltas = [stream.push(b) for b in text.encode()]
    deltas.append(stream.flush())
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert "😀" in deltas and "€" in deltas  # each multi-byte character arrives whole, in one delta
    pieces = [b"h", b"\xc3", b"\xa9l", b"lo \xe2\x82", b"\xac\xf0\x9f", b"\x98\x80!", b"\xe6"]
    stream = TextStream(PieceTokenizer(pieces))
    deltas = [stream.push(i) for i in range(len(pieces))]
    assert deltas == ["h", "", "él", "lo ", "€", "😀!", ""]
    assert stream.flush() == "\ufffd"  # an unfinished character at the very end is shown as such


def test_stop_string_filter_holds_back_possible_starts():
    f = StopStringFilter(["</s>", "STOP"])
    assert f.push("Hel") == ("Hel", False)
    assert f.push("lo <") == ("lo ", False)
    assert f.push("b> S") == ("<b> ", False)
    assert f.push("T") == ("", False)
    assert f.push("x") == ("STx", False)
    assert f.push(" </") == (" ", False)
    assert f.push("s> tail") == ("", True)
    g = StopStringFilter(["ab"])
    assert g.push("xa") == ("x", False)
    assert g.flush() == "a"


def test_generated_text_equals_decode_of_the_ids(helpers):
    """Random bytes from a random model: whatever arrives split, the deltas add up to the decoded ids."""
    model = _model(helpers)
    for seed in range(3):
        ids, text, last = _run(model, PROMPT, max_new_tokens=40, temperature=1.5, seed=seed)
        assert text == ByteTokenizer().decode([i for i in ids if i != EOS])


def test_stop_strings_end_generation_and_are_not_emitted(helpers):
    model = _model(helpers)
    tok = PieceTokenizer([chr(32 + i % 95).encode() for i in range(257)])  # every token a printable character
    full_ids, full, _ = _run(model, PROMPT, tok, max_new_tokens=40, temperature=1.0, seed=3)
    assert len(full) == 40
    stop = full[12:15]
    ids, text, last = _run(model, PROMPT, tok, max_new_tokens=40, temperature=1.0, seed=3,
                           stop_strings=(stop, "never printed"))
    assert last.finish_reason == "stop_string"
    assert text == full[:full.index(stop)]
    assert ids == full_ids[:len(ids)] and len(ids) < len(full_ids)
    assert tok.decode(ids).endswith(stop)  # the token that completed it was the last one sampled


def test_eos_and_stop_token_ids(helpers):
    model = _model(helpers)
    ids, text, _ = _run(model, PROMPT, max_new_tokens=20, temperature=1.0, seed=5)
    stop_token = ids[6]
    first = ids.index(stop_token)
    got, got_text, last = _run(model, PROMPT, max_new_tokens=20, temperature=1.0, seed=5,
                               stop_token_ids=(stop_token,))
    assert last.finish_reason == "eos"
    assert got == ids[:first + 1]  # the stop token is reported in token_ids...
    assert got_text == ByteTokenizer().decode(ids[:first])  # ...but its text is not emitted


def test_length_limit_metrics_and_context_window(helpers):
    model = _model(helpers)
    no_eos = PieceTokenizer([bytes([i % 256]) for i in range(257)])
    ids, _, last = _run(model, PROMPT, no_eos, max_new_tokens=7)
    m = last.metrics
    assert last.finish_reason == "length" and len(ids) == 7
    assert m.prompt_tokens == len(PROMPT) and m.cached_tokens == 0 and m.new_tokens == len(ids)
    assert 0 < m.prefill_ms <= m.ttft_ms <= m.total_ms
    assert m.decode_tokens_per_s > 0 or len(ids) == 1
    small = _model(helpers, max_position_embeddings=len(PROMPT) + 4)
    model_ids, _, last = _run(small, PROMPT, no_eos, max_new_tokens=50)
    assert last.finish_reason == "context_window" and len(model_ids) == 5


def test_continues_from_a_cached_prefix(helpers, form):
    model = _model(helpers, form)
    want, want_text, _ = _run(model, PROMPT, max_new_tokens=10, stop_token_ids=())
    source = model.new_cache()
    prefill(model, source, PROMPT[:15])
    for cached in (15, len(PROMPT)):
        cache = model.new_cache(capacity=2)
        if cached == 15:
            cache.import_(source.export(0, 0, 15), seq=0, at=0)  # what the store does
        else:
            prefill(model, cache, PROMPT, chunk_size=4)  # the whole prompt cached: the last token is re-run
        ids, text, last = _run(model, PROMPT, cache=cache, max_new_tokens=10, stop_token_ids=())
        assert ids == want and text == want_text
        assert last.metrics.cached_tokens == min(cached, len(PROMPT) - 1)
        assert cache.length(0) == len(PROMPT) + len(ids) - 1


def test_user_errors(helpers):
    model = _model(helpers, max_position_embeddings=30)
    with pytest.raises(TPAError, match="empty"):
        list(generate(model, ByteTokenizer(), [], GenerationConfig()))
    with pytest.raises(TPAError, match="context window"):
        list(generate(model, ByteTokenizer(), [1] * 31, GenerationConfig()))
    cache = model.new_cache()
    prefill(model, cache, [1, 2, 3, 4])
    with pytest.raises(TPAError, match="more than"):
        list(generate(model, ByteTokenizer(), [1, 2, 3], GenerationConfig(), cache=cache))
    with pytest.raises(TPAError, match="context window"):
        prefill(model, cache, [0] * 27)
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0),
                dict(top_p=1.5), dict(prefill_chunk_size=0), dict(contrast=-0.5), dict(contrast=11.0)):
        with pytest.raises(TPAError, match=next(iter(bad))):
            GenerationConfig(**bad)


def test_prefill_cuts_chunks_at_absolute_positions(helpers, monkeypatch):
    """After a restored prefix, chunks end where a fresh prefill of the whole prompt ends them."""
    import tpa_core.generate as generate_module

    model = _model(helpers)
    cuts: list[tuple[int, int]] = []
    real_forward_last = generate_module._forward_last

    def recording_forward_last(model_, cache, ids, seq):
        start = cache.length(seq)
        cuts.append((start, start + ids.shape[1]))
        return real_forward_last(model_, cache, ids, seq)

    monkeypatch.setattr(generate_module, "_forward_last", recording_forward_last)
    prompt = list(range(1, 24))
    fresh = model.new_cache()
    prefill(model, fresh, prompt, chunk_size=8)
    assert cuts == [(0, 8), (8, 16), (16, 23)]
    cuts.clear()
    resumed = model.new_cache()
    resumed.import_(fresh.export(0, 0, 11), seq=0, at=0)
    prefill(model, resumed, prompt[11:], chunk_size=8)
    assert cuts == [(11, 16), (16, 23)]
    assert torch.equal(resumed.export(0, 16, 23)["layers.0.bk"], fresh.export(0, 16, 23)["layers.0.bk"])


def test_contrast_scores_weigh_out_what_the_context_does_not_change():
    logits = torch.tensor([4.0, 3.9, 2.5, -3.0])
    plain = torch.tensor([4.0, 2.0, 1.0, -9.0])  # without the context token 1 is much less likely
    scores = contrast_logits(logits, plain, 1.0)
    assert int(scores.argmax()) == 1  # (2 * 3.9 - 2.0) > (2 * 4.0 - 4.0)
    # token 3 gains most from the context but the prompt itself finds it implausible: never chosen
    assert float(torch.softmax(logits, 0)[3] / torch.softmax(logits, 0)[0]) < CONTRAST_PLAUSIBLE
    assert scores[3] == float("-inf") and torch.isfinite(scores[:3]).all()
    torch.testing.assert_close(contrast_logits(logits, plain, 0.0)[:3], logits[:3])


def test_context_aware_decoding_follows_its_formula(helpers):
    model = _model(helpers)
    prompt = list(b"Context: the answer is 42. Question: the answer? ")
    contrast = list(b"Context: Question: the answer? ")  # shares its first 9 tokens with the prompt
    ids, _, _ = _run(model, prompt, max_new_tokens=8, stop_token_ids=(), contrast=2.0)
    got = [t for e in generate(model, ByteTokenizer(), prompt, GenerationConfig(max_new_tokens=8, contrast=2.0),
                               contrast_ids=contrast) for t in e.token_ids]
    plain_run = ids  # contrast weight without contrast_ids: decoding is plain
    want, full, bare = [], list(prompt), list(contrast)
    with torch.inference_mode():
        for _ in range(8):
            scores = contrast_logits(model(torch.tensor([full]))[0, -1], model(torch.tensor([bare]))[0, -1], 2.0)
            token = int(scores.argmax())
            want.append(token)
            if token == EOS:
                break
            full.append(token)
            bare.append(token)
    assert got == want
    assert got != plain_run  # the contrast changed the answer of this random model


def test_a_contrast_prompt_equal_to_the_prompt_changes_nothing(helpers):
    model = _model(helpers)
    plain, _, _ = _run(model, PROMPT, max_new_tokens=10, stop_token_ids=())
    same = [t for e in generate(model, ByteTokenizer(), PROMPT, GenerationConfig(max_new_tokens=10, contrast=1.0),
                                contrast_ids=PROMPT) for t in e.token_ids]
    assert same == plain
