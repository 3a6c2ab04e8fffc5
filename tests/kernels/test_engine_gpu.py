"""End to end on a GPU: the engine with the Triton kernels against the engine with the torch reference.

The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) is looked up at $TPA_E2E_GGUF, then in the test-model and
download caches; the test skips without CUDA or without the file (no network is used).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = (
    "Tensor product attention factorises queries, keys and values into sums of outer products of small head "
    "and token factors, so the cache stores only the factors. Explain in a few sentences why this makes long "
    "contexts cheaper to serve, and what a decode kernel must read for every new token. "
) * 3
NEW_TOKENS = 64


def _find_gguf() -> Path | None:
    candidates = [os.environ.get("TPA_E2E_GGUF", ""),
                  str(Path(__file__).resolve().parents[2] / ".e2e" / GGUF_NAME),
                  str(Path.home() / ".cache" / "tpa-rag-test-models" / "raw" / GGUF_NAME)]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    path = _find_gguf()
    if path is None:
        pytest.skip(f"{GGUF_NAME} not found (set TPA_E2E_GGUF)")
    return path


def _load(path: Path, models_dir: Path, dtype: torch.dtype):
    from tpa_core.loading import load_model

    return load_model(path, models_dir, device="cuda", dtype=dtype)


@torch.inference_mode()
def _greedy(model, prompt_ids: list[int], backend: str, n_new: int) -> list[int]:
    model.attention_backend = backend
    cache = model.new_cache(batch_size=1, capacity=len(prompt_ids) + n_new)
    ids = torch.tensor([prompt_ids], device="cuda")  # [1, n]
    logits = model(ids, cache, seq=0, last_only=True)[0, -1]  # prefill kernel (N > 1)
    out = []
    for _ in range(n_new):
        token = int(logits.argmax())
        out.append(token)
        logits = model(torch.tensor([[token]], device="cuda"), cache, seq=0, last_only=True)[0, -1]  # decode
    return out


@torch.inference_mode()
def _teacher_forced_top1(model, prompt_ids: list[int], continuation: list[int], backend: str) -> torch.Tensor:
    """Top-1 token at every prompt position (prefill) and after every continuation token (decode)."""
    model.attention_backend = backend
    cache = model.new_cache(batch_size=1, capacity=len(prompt_ids) + len(continuation))
    logits = model(torch.tensor([prompt_ids], device="cuda"), cache, seq=0)[0]  # [n, V]
    tops = [logits.argmax(-1)]
    for token in continuation:
        step = model(torch.tensor([[token]], device="cuda"), cache, seq=0, last_only=True)[0, -1]
        tops.append(step.argmax(-1, keepdim=True))
    return torch.cat(tops)


def test_float32_triton_reproduces_torch_greedy_tokens(gguf_path: Path, tmp_path_factory) -> None:
    loaded = _load(gguf_path, tmp_path_factory.mktemp("models"), torch.float32)
    prompt_ids = loaded.tokenizer.encode(PROMPT)
    want = _greedy(loaded.model, prompt_ids, "torch", NEW_TOKENS)
    got = _greedy(loaded.model, prompt_ids, "triton", NEW_TOKENS)
    assert got == want


# More text for the bf16 comparison: one prompt gives ~230 positions, where a single near-tie moves the figure by
# 0.4 points; six prompts of different kinds (prose, code, a list, a how-to, a table, a letter) give ~1,300.
BF16_PROMPTS = [
    PROMPT,
    "def merge_partials(outputs, lses):\n"
    "    # Each slice of the sequence produced a normalised output and its log-sum-exp.\n"
    "    top = max(lses)\n"
    "    weights = [math.exp(x - top) for x in lses]\n"
    "    total = sum(weights)\n"
    "    return [sum(w * o[i] for w, o in zip(weights, outputs)) / total for i in range(len(outputs[0]))]\n\n"
    "Explain what this function computes, why it subtracts the maximum first, and what goes wrong if it "
    "subtracted the minimum instead when two slices differ by a large margin.",
    "Here is a packing list for a week of hiking in the mountains: boots, two pairs of wool socks, a rain jacket, "
    "a warm hat, a map of the valley, a compass, water bottles, a small stove, oats, rice, dried fruit, a first "
    "aid kit and a headlamp. Which three items matter most if the weather turns, and why?",
    "To repot a house plant, water it the day before, choose a pot one size larger with a drainage hole, loosen "
    "the root ball gently, trim any dark or mushy roots, set the plant at the same depth as before, fill around it "
    "with fresh soil and water until it drains. What should you do in the first week after repotting?",
    "| city | population | river |\n|---|---|---|\n| Vienna | 2.0 million | Danube |\n| Prague | 1.3 million | "
    "Vltava |\n| Budapest | 1.7 million | Danube |\n| Warsaw | 1.8 million | Vistula |\n\nWhich of these cities "
    "share a river, which is the largest, and how would you add a column for the country?",
    "Dear neighbours, the water supply to our building will be switched off on Tuesday from nine in the morning "
    "until about three in the afternoon while the old pipes in the basement are replaced. Please fill a few "
    "bottles the evening before. Write a short, friendly reply asking whether the laundry room will stay open.",
]
BF16_NEW_TOKENS = 96


def test_bfloat16_triton_agrees_on_top1(gguf_path: Path, tmp_path_factory) -> None:
    """bf16 top-1 tokens, teacher-forced on the float32 engine's greedy continuation, over six prompts: the
    Triton and torch backends agree on >= 99% (the issue's bound; the engines differ only in attention).

    Also reported: each bf16 engine's agreement with the float32 engine, and the figures over the first three
    prompts (the first three alone: 669 positions). The figures are in benchmarks/RESULTS.md ("bf16 on the GPU, end
    to end").
    """
    models = tmp_path_factory.mktemp("models")
    f32 = _load(gguf_path, models, torch.float32)
    prompts = [f32.tokenizer.encode(text) for text in BF16_PROMPTS]
    continuations = [_greedy(f32.model, ids, "torch", BF16_NEW_TOKENS) for ids in prompts]
    ref = [_teacher_forced_top1(f32.model, ids, cont, "torch") for ids, cont in zip(prompts, continuations)]
    del f32
    bf16 = _load(gguf_path, models, torch.bfloat16)
    tri = [_teacher_forced_top1(bf16.model, ids, cont, "triton") for ids, cont in zip(prompts, continuations)]
    tor = [_teacher_forced_top1(bf16.model, ids, cont, "torch") for ids, cont in zip(prompts, continuations)]
    prefill = [torch.arange(len(r), device=r.device) < len(ids) for r, ids in zip(ref, prompts)]  # prompt positions

    def agreement(a: list[torch.Tensor], b: list[torch.Tensor], n: int) -> tuple[float, int, int, int]:
        same, at_prompt = torch.cat([x == y for x, y in zip(a[:n], b[:n])]), torch.cat(prefill[:n])
        return float(same.float().mean()), same.numel(), int((~same & at_prompt).sum()), int((~same & ~at_prompt).sum())

    for n in (3, len(prompts)):
        between, positions, at_prompt, at_decode = agreement(tri, tor, n)
        print(f"{n} prompts, {positions} positions: triton bf16 vs torch bf16 {between:.4f} ({at_prompt} prompt and "
              f"{at_decode} decoded positions differ); with the float32 engine: triton bf16 "
              f"{agreement(tri, ref, n)[0]:.4f}, torch bf16 {agreement(tor, ref, n)[0]:.4f}")
    assert between >= 0.99, f"triton and torch bf16 engines agree on {between:.4f} of top-1 tokens (< 0.99)"
