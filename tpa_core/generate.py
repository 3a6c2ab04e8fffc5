"""Generation: chunked prefill, the decode loop, sampling, stop conditions and streaming text deltas.

API::

    cfg = GenerationConfig(max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, seed=None,
                           stop_token_ids=(), stop_strings=(), prefill_chunk_size=512, contrast=0.0)
    for event in generate(model, tokenizer, prompt_ids, cfg, cache=None, contrast_ids=None):
        print(event.text, end="")          # a text delta, never a split UTF-8 character, never a stop string
        event.token_ids                    # the token(s) sampled at this step (the EOS token included)
        if event.finish_reason:            # "eos" | "stop_string" | "length" | "context_window" (last event)
            event.metrics                  # GenerationMetrics: prompt_tokens, cached_tokens, prefill_ms, ttft_ms...

    logits = prefill(model, cache, token_ids, seq=0, chunk_size=512)   # [V] logits after the last token

Tokenizer protocol (all that `generate` uses): `decode(ids: list[int]) -> str`, where bytes that do not yet form
a whole character come out as U+FFFD (what byte-level BPE and SentencePiece decoders do), and an optional
`eos_token_ids` attribute (a collection of ints) naming the tokens that end generation.

A cache that already holds a prefix of the prompt (imported from the store) is continued: `generate` prefills
only `prompt_ids[cache.length(seq):]`, and `prefill` takes exactly the tokens not yet in the cache. After
`generate` the cache holds the prompt and every generated token except the last one sampled.

Context-aware decoding (Shi et al. 2023, "Trusting Your Evidence: Hallucinate Less with Context-aware Decoding"):
with `contrast` = a > 0 and `contrast_ids` = the prompt without its context, each step samples from
(1 + a) l(prompt) - a l(contrast prompt), both continued by the tokens generated so far: what the context makes
likely gains over what the model would say without it. Tokens the prompt alone finds implausible (probability
under `CONTRAST_PLAUSIBLE` of the best one's) are never chosen, so the difference cannot promote noise.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from tpa_core.cache import FactorCache
from tpa_core.errors import TPAError
from tpa_core.model import TPAModel

logger = logging.getLogger(__name__)

FINISH_REASONS = ("eos", "stop_string", "length", "context_window")
CONTRAST_PLAUSIBLE = 0.1  # context-aware decoding keeps the tokens within this factor of the best one's probability


class DecodingTokenizer(Protocol):
    """What generation needs from a tokenizer (see the module docstring)."""

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class GenerationConfig:
    """Sampling and stopping settings. temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # in addition to the tokenizer's eos_token_ids
    stop_strings: tuple[str, ...] = ()
    prefill_chunk_size: int = 512
    contrast: float = 0.0  # context-aware decoding's weight a (module docstring); 0 = off

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise TPAError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise TPAError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise TPAError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise TPAError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.prefill_chunk_size, int) or self.prefill_chunk_size < 1:
            raise TPAError(f"prefill_chunk_size must be a positive integer, got {self.prefill_chunk_size!r}")
        if not 0 <= self.contrast <= 10:
            raise TPAError(f"contrast must be in [0, 10] (0 = off), got {self.contrast!r}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        self.stop_strings = tuple(s for s in self.stop_strings if s)


@dataclass
class GenerationMetrics:
    """Timings of one `generate` call (milliseconds, tokens/s; wall clock)."""

    prompt_tokens: int  # the whole prompt
    cached_tokens: int  # of which were already in the cache (not prefilled)
    new_tokens: int  # tokens sampled (an EOS token included)
    prefill_ms: float  # prefill of the uncached remainder, up to its last logits
    ttft_ms: float  # from the call to the first sampled token
    decode_tokens_per_s: float  # tokens after the first, over the time after the first
    total_ms: float


@dataclass
class GenerationEvent:
    """One step of the stream: the sampled token(s) and the text that became safe to show."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # set on the last event only
    metrics: GenerationMetrics | None = None  # set on the last event only

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


# ----- prefill and sampling -----------------------------------------------------------------------------------
@torch.inference_mode()
def _forward_last(model: TPAModel, cache: FactorCache, ids: Tensor, seq: int) -> Tensor:
    return model(ids, cache, seq=seq, last_only=True)[0, -1]  # [V]


def prefill(model: TPAModel, cache: FactorCache, token_ids: Sequence[int] | Tensor, seq: int = 0,
            chunk_size: int = 512) -> Tensor:
    """Append `token_ids` (the tokens not yet in the cache) to sequence `seq`, `chunk_size` tokens per forward.

    Returns the float32 logits `[V]` after the last token. Raises TPAError for an empty input or one that
    would overflow the context window.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(1, -1).to(model.device)  # [1, n]
    n = ids.shape[1]
    if n == 0:
        raise TPAError("prefill needs at least one token")
    if chunk_size < 1:
        raise TPAError(f"chunk_size must be positive, got {chunk_size}")
    total = cache.length(seq) + n
    window = model.config.max_position_embeddings
    if total > window:
        raise TPAError(f"the prompt needs {total} tokens but the model's context window is {window} tokens")
    cache.reserve(total)
    # Chunks end at absolute positions (multiples of chunk_size from the sequence start), so a prompt prefilled
    # after a restored prefix is cut where a fresh prefill of the whole prompt is cut past that prefix.
    done = cache.length(seq)
    bounds = [*range((done // chunk_size + 1) * chunk_size, total, chunk_size), total]
    logits = None
    start = 0
    for end in bounds:
        logits = _forward_last(model, cache, ids[:, start:end - done], seq)
        start = end - done
    return logits


def sample_token(logits: Tensor, config: GenerationConfig, generator: torch.Generator | None = None) -> int:
    """Pick the next token from logits `[V]`: greedy at temperature 0, else top-k / top-p sampling."""
    if config.temperature == 0:
        return int(logits.argmax())
    scores = logits.float() / config.temperature
    vocab = scores.shape[-1]
    if 0 < config.top_k < vocab:
        scores, index = scores.topk(config.top_k)  # [k], sorted descending
    elif config.top_p < 1.0:
        scores, index = scores.sort(descending=True)  # [V]
    else:
        index = None
    if config.top_p < 1.0:
        probs = torch.softmax(scores, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the best one always stays)
        drop = (probs.cumsum(-1) - probs) >= config.top_p
        scores = scores.masked_fill(drop, float("-inf"))
    choice = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)
    return int(choice) if index is None else int(index[choice])


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def contrast_logits(logits: Tensor, plain: Tensor, weight: float) -> Tensor:
    """Context-aware decoding's scores `[V]`: (1 + weight) logits - weight plain, where `logits` follow the prompt
    and `plain` the prompt without its context; tokens whose probability under `logits` is below
    CONTRAST_PLAUSIBLE of the best one's get -inf."""
    mixed = (1 + weight) * logits - weight * plain  # [V]
    implausible = logits < logits.max() + math.log(CONTRAST_PLAUSIBLE)
    return mixed.masked_fill(implausible, float("-inf"))


class _ContrastSequence:
    """The contrast prompt of context-aware decoding, in a cache of its own, kept in step with the generation."""

    def __init__(self, model: TPAModel, cache: FactorCache, seq: int, prompt: list[int], contrast_ids: list[int],
                 chunk_size: int, max_new_tokens: int) -> None:
        window = model.config.max_position_embeddings
        if not contrast_ids or len(contrast_ids) > window:
            raise TPAError(f"the contrast prompt needs 1 to {window} tokens, got {len(contrast_ids)}")
        self.model = model
        self.cache = model.new_cache(capacity=min(window, len(contrast_ids) + max_new_tokens))
        # the tokens it shares with the prompt's start (the system prompt) are copied from the prompt's cache
        shared = min(common_prefix(contrast_ids, prompt), len(contrast_ids) - 1, cache.length(seq))
        if shared:
            self.cache.import_(cache.export(seq, 0, shared), 0, 0)
        self.logits = prefill(model, self.cache, contrast_ids[shared:], chunk_size=chunk_size)  # [V]
        self.step_ids = torch.empty((1, 1), dtype=torch.long, device=model.device)

    def step(self, token: int) -> None:
        """Continue the contrast prompt by the token the generation chose (a full window stops here)."""
        if self.cache.length(0) + 1 <= self.model.config.max_position_embeddings:
            self.step_ids.fill_(token)
            self.logits = _forward_last(self.model, self.cache, self.step_ids, 0)


# ----- streaming text -----------------------------------------------------------------------------------------
class TextStream:
    """Incremental detokenization whose deltas never contain part of a multi-byte character.

    Decodes a short window of recent tokens twice (with and without the tokens not yet fully shown; the older
    tokens give context, e.g. for decoders that strip a leading space) and releases the new text up to any
    trailing U+FFFD, which stands for a character whose remaining bytes are still to come.
    """

    def __init__(self, tokenizer: DecodingTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start (context)
        self._read = 0  # tokens before this index are wholly shown
        self._shown = 0  # characters already shown from the tokens after `_read`

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became complete (possibly "")."""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        new = self.tokenizer.decode(self.ids[self._prefix:])[len(before):]
        stable = new.rstrip("\ufffd")
        delta = stable[self._shown:]
        self._shown = max(self._shown, len(stable))
        if len(stable) == len(new):  # a clean token boundary: move the window on
            self._prefix, self._read, self._shown = self._read, len(self.ids), 0
        return delta

    def flush(self) -> str:
        """Release whatever is pending (at the end of generation), replacement characters included."""
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        new = self.tokenizer.decode(self.ids[self._prefix:])[len(before):]
        delta = new[self._shown:]
        self._prefix = self._read = len(self.ids)
        self._shown = 0
        return delta


class StopStringFilter:
    """Cuts the stream at the first stop string; holds back text that may be the start of one."""

    def __init__(self, stop_strings: Sequence[str]) -> None:
        self.stops = [s for s in stop_strings if s]
        self.held = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """Feed a text delta; returns (text safe to emit, whether a stop string was found)."""
        if not self.stops:
            return delta, False
        buf = self.held + delta
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return buf[:cut], True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """The held-back text, at the end of generation (it never became a stop string)."""
        out, self.held = self.held, ""
        return out


# ----- the loop -----------------------------------------------------------------------------------------------
def generate(model: TPAModel, tokenizer: Any, prompt_ids: Sequence[int], config: GenerationConfig,
             cache: FactorCache | None = None, seq: int = 0, contrast_ids: Sequence[int] | None = None
             ) -> Iterator[GenerationEvent]:
    """Stream the continuation of `prompt_ids` (the whole prompt; see the module docstring for a cached prefix).
    `contrast_ids`: the prompt without its context, for context-aware decoding when `config.contrast` > 0.

    Yields one event per sampled token; the last event has `finish_reason` and `metrics`.
    Raises TPAError (before yielding anything) for an empty prompt, a prompt longer than the context window or
    a cache that holds more tokens than the prompt.
    """
    t_start = time.perf_counter()
    prompt = [int(t) for t in prompt_ids]
    window = model.config.max_position_embeddings
    if not prompt:
        raise TPAError("the prompt is empty")
    if len(prompt) > window:
        raise TPAError(f"the prompt has {len(prompt)} tokens but the model's context window is {window} tokens")
    if cache is None:
        cache = model.new_cache(batch_size=1, capacity=min(window, len(prompt) + config.max_new_tokens))
    cached = cache.length(seq)
    if cached > len(prompt):
        raise TPAError(f"the cache holds {cached} tokens, more than the {len(prompt)}-token prompt")
    if cached == len(prompt):  # the last prompt token's logits are needed: run it again
        cached -= 1
        cache.truncate(seq, cached)
    stop_ids = set(getattr(tokenizer, "eos_token_ids", None) or ()) | set(config.stop_token_ids)
    generator = torch.Generator(device=model.device)
    if config.seed is not None:
        generator.manual_seed(config.seed)
    else:
        generator.seed()

    t_prefill_start = time.perf_counter()
    logits = prefill(model, cache, prompt[cached:], seq=seq, chunk_size=config.prefill_chunk_size)
    contrast = None
    if config.contrast > 0 and contrast_ids is not None:
        contrast = _ContrastSequence(model, cache, seq, prompt, [int(t) for t in contrast_ids],
                                     config.prefill_chunk_size, config.max_new_tokens)
    t_prefill = time.perf_counter()
    stream, stops = TextStream(tokenizer), StopStringFilter(config.stop_strings)
    step_ids = torch.empty((1, 1), dtype=torch.long, device=model.device)
    new_tokens = 0
    t_first = t_prefill

    def finish(token: list[int], text: str, reason: str) -> GenerationEvent:
        t_end = time.perf_counter()
        decode_time = t_end - t_first
        metrics = GenerationMetrics(
            prompt_tokens=len(prompt), cached_tokens=cached, new_tokens=new_tokens,
            prefill_ms=(t_prefill - t_prefill_start) * 1e3,
            ttft_ms=(t_first - t_start) * 1e3,
            decode_tokens_per_s=(new_tokens - 1) / decode_time if new_tokens > 1 and decode_time > 0 else 0.0,
            total_ms=(t_end - t_start) * 1e3,
        )
        return GenerationEvent(token, text, reason, metrics)

    while True:
        scores = logits if contrast is None else contrast_logits(logits, contrast.logits, config.contrast)
        token = sample_token(scores, config, generator)
        new_tokens += 1
        if new_tokens == 1:
            t_first = time.perf_counter()
        if token in stop_ids:
            tail, stopped = stops.push(stream.flush())
            yield finish([token], tail if stopped else tail + stops.flush(), "stop_string" if stopped else "eos")
            return
        text, stopped = stops.push(stream.push(token))
        if stopped:
            yield finish([token], text, "stop_string")
            return
        full = cache.length(seq) + 1 > window
        if new_tokens >= config.max_new_tokens or full:
            tail, stopped = stops.push(stream.flush())
            text += tail if stopped else tail + stops.flush()
            reason = "stop_string" if stopped else ("length" if new_tokens >= config.max_new_tokens
                                                    else "context_window")
            yield finish([token], text, reason)
            return
        yield GenerationEvent([token], text)
        step_ids.fill_(token)
        logits = _forward_last(model, cache, step_ids, seq)
        if contrast is not None:
            contrast.step(token)
