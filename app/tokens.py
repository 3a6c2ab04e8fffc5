"""Token-level helpers of the ask flow: a conversation's ids that keep each earlier answer's generated ids, and
the detection of an answer stuck in a loop.

Re-tokenizing an answer's text does not always give back the ids the model generated (BPE has several ways to
spell a string, and a random or small model happily picks a non-canonical one). The factor cache of a session
holds the generated ids, so the next prompt must use them, or its cached prefix ends where the first answer
begins. The rest of the prompt is tokenized as the chat template renders it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

# Generation stops when the answer ends with one block of 8..200 ids said over and over: three times for a block
# shorter than LONG_REPEAT_PERIOD ids (a phrase may be said twice on purpose), twice for a longer one (a sentence or
# more said twice in a row is a loop: the default 135M model's greedy answers fall into ones of two sentences, which
# three copies let run to the length limit).
MIN_REPEAT_PERIOD = 8
LONG_REPEAT_PERIOD = 24
MAX_REPEAT_PERIOD = 200


def encode_conversation(tokenizer: Any, messages: list[dict[str, str]],
                        answer_ids: Mapping[int, list[int]]) -> list[int]:
    """Ids of `messages` rendered with the chat template (generation prompt added), where the assistant message
    at index i of `answer_ids` is spelled with the ids given for it.

    An answer is spliced in only where the template renders the conversation up to that message as a prefix of
    the whole and the ids decode to the message's text; otherwise its text is tokenized like the rest.
    """
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids: list[int] = []
    pos = 0
    for index in sorted(answer_ids):
        spelled = answer_ids[index]
        content = messages[index]["content"]
        if not spelled or messages[index]["role"] != "assistant" or tokenizer.decode(spelled) != content:
            continue
        head = tokenizer.apply_chat_template(messages[:index], add_generation_prompt=True)
        if len(head) < pos or not full.startswith(head) or not full.startswith(content, len(head)):
            continue
        ids += tokenizer.encode(full[pos:len(head)], add_special_tokens=False)
        ids += [int(t) for t in spelled]
        pos = len(head) + len(content)
    ids += tokenizer.encode(full[pos:], add_special_tokens=False)
    return ids


def copies_of_a_loop(period: int) -> int:
    """How many back-to-back copies of a block of `period` ids make a loop."""
    return 2 if period >= LONG_REPEAT_PERIOD else 3


def repeating(ids: Sequence[int], min_period: int = MIN_REPEAT_PERIOD, max_period: int = MAX_REPEAT_PERIOD) -> int:
    """The period p when the last `copies_of_a_loop(p)` * p ids are one block of p ids repeated (a small model stuck
    in a loop, as greedy decoding of a 135M model often is), else 0; the shortest such p. Blocks shorter than
    `min_period` ids (a word or two said twice) never count."""
    n = len(ids)
    for p in range(min_period, min(max_period, n // 2) + 1):
        copies = copies_of_a_loop(p)
        if copies * p > n or ids[-1] != ids[-1 - p]:
            continue
        if all(ids[n - p:] == ids[n - (k + 1) * p:n - k * p] for k in range(1, copies)):
            return p
    return 0


def without_loop(ids: Sequence[int], period: int, decode: Callable[[Sequence[int]], str]) -> list[int]:
    """The ids of an answer that `repeating` found looping with `period`: one copy of the block kept, then cut back
    to the last end of a sentence or paragraph inside that copy when there is one (the copies may start mid-sentence),
    so that the answer does not stop halfway through a repeated sentence."""
    kept = list(ids[:len(ids) - (copies_of_a_loop(period) - 1) * period])
    for end in range(len(kept), max(len(kept) - period, 0), -1):
        text = decode(kept[:end])
        if text.endswith("\n\n") or text.rstrip().endswith((".", "!", "?")):
            return kept[:end]
    return kept
