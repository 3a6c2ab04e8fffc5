"""Token-level helpers of the ask flow: a conversation's ids that keep each earlier answer's generated ids, and
the detection of an answer stuck in a loop.

Re-tokenizing an answer's text does not always give back the ids the model generated (BPE has several ways to
spell a string, and a random or small model happily picks a non-canonical one). The factor cache of a session
holds the generated ids, so the next prompt must use them, or its cached prefix ends where the first answer
begins. The rest of the prompt is tokenized as the chat template renders it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Generation stops when the answer ends with the same block of ids REPEATS times (8..200 ids per block).
REPEATS = 3
MIN_REPEAT_PERIOD = 8
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


def repeating(ids: Sequence[int], min_period: int = MIN_REPEAT_PERIOD, max_period: int = MAX_REPEAT_PERIOD) -> int:
    """The period p when the last REPEATS * p ids are one block of p ids repeated (a small model stuck in a
    loop, as greedy decoding of a 135M model often is), else 0. Blocks shorter than `min_period` ids (a word
    or two said twice) never count."""
    n = len(ids)
    for p in range(min_period, min(max_period, n // REPEATS) + 1):
        if ids[-1] != ids[-1 - p]:
            continue
        if all(ids[n - p:] == ids[n - (k + 1) * p:n - k * p] for k in range(1, REPEATS)):
            return p
    return 0
