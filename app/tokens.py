"""Token ids of a conversation whose earlier answers keep the ids they were generated with.

Re-tokenizing an answer's text does not always give back the ids the model generated (BPE has several ways to
spell a string, and a random or small model happily picks a non-canonical one). The factor cache of a session
holds the generated ids, so the next prompt must use them, or its cached prefix ends where the first answer
begins. The rest of the prompt is tokenized as the chat template renders it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


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
