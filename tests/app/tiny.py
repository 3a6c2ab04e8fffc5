"""A tiny random TPA model with a real byte-level BPE tokenizer and ChatML template, and a small deterministic
embedder: what the app's tests inject into `ChatService` so that they run in seconds on two CPU cores."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_TRAINING_TEXT = """
You are a helpful assistant for questions about the user's documents and code. Answer from the numbered context
below. Cite the sources you use by their number. If the context does not contain the answer, say so. Context lines
The factor cache store keys its entries by a chained sha256 over the namespace, the parent key and the token ids.
def page_key(namespace, parent, token_ids): return sha256(namespace + parent + bytes(token_ids)).hexdigest()
Tensor Product Attention factorizes queries, keys and values into contextual low-rank tensor products.
What is the capital of France? Paris is the capital of France. How does the cache work? What does it store?
"""


def tiny_tokenizer():
    """A byte-level BPE (any byte sequence encodes, any id decodes) trained on a few sentences, with ChatML."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from tpa_core.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([_TRAINING_TEXT] * 4, trainer=trainer)
    eos = backend.token_to_id("<|im_end|>")
    return Tokenizer(backend=backend, bos_token=None, eos_token="<|im_end|>", eos_token_ids=[eos],
                     chat_template=CHATML)


def tiny_loaded_model(window: int = 2048, seed: int = 0, q_rank: int = 0):
    """A LoadedModel around a random 2-layer KV-only TPA model (contextual K/V factors)."""
    import torch

    from tpa_core.config import TPAConfig
    from tpa_core.loading import LoadedModel
    from tpa_core.model import TPAModel

    tokenizer = tiny_tokenizer()
    config = TPAConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, head_dim=8, k_rank=2,
                       v_rank=2, q_rank=q_rank, mlp_hidden=64, max_position_embeddings=window,
                       eos_token_ids=tuple(tokenizer.eos_token_ids))
    torch.manual_seed(seed)
    model = TPAModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the init: sharper, more varied random outputs
            p.mul_(4.0)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    digest.update(tokenizer.fingerprint_text().encode())
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, fingerprint=digest.hexdigest(),
                       chat_template=CHATML, name="tiny-random", source=Path("tiny"), cache_dir=Path("tiny"))


class HashingEmbedder:
    """Hashed bag of words (and word bigrams), L2-normalized: deterministic, instant, and good enough to find a
    chunk that shares words with the question."""

    name = "test-hashing-embedder-256"

    def __init__(self, dim: int = 256) -> None:
        self._dim = dim
        self.calls = 0

    @property
    def dim(self) -> int:
        return self._dim

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(re.findall(r"[a-z0-9]+", text.lower())) for text in texts]

    def embed(self, texts: Sequence[str], progress=None) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = re.findall(r"[a-z0-9]+", text.lower())
            for feature in words + [a + " " + b for a, b in zip(words, words[1:])]:
                h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
                out[row, h % self._dim] += 1.0 if (h >> 32) & 1 else -1.0
            norm = np.linalg.norm(out[row])
            out[row] = out[row] / norm if norm else out[row]
            if not norm:
                out[row, 0] = 1.0
            if progress is not None:
                progress(row + 1, len(texts))
        return out


class SlowEmbedder(HashingEmbedder):
    """The hashing embedder, `delay_s` slower per call: long enough for a browser test to watch progress."""

    def __init__(self, delay_s: float, dim: int = 256) -> None:
        super().__init__(dim)
        self.delay_s = delay_s

    def embed(self, texts: Sequence[str], progress=None) -> np.ndarray:
        import time

        time.sleep(self.delay_s)
        return super().embed(texts, progress)
