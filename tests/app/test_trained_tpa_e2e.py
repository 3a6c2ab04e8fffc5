"""End to end with a trained contextual-TPA model: train it on the CPU for a few seconds, save it as a T6
checkpoint, let the app load it by path, ingest a corpus and ask twice in a session. The second ask must restore
the contextual factors (ak, av, bk, bv) from the store, and the restored cache must give the logits of a fresh
prefill. The GPU test does the same through the FlashTPA Triton kernels (bf16 on CUDA); it skips without CUDA."""

from __future__ import annotations

import pytest
import torch
from tiny import HashingEmbedder

QUESTION = "How does the cache store key its entries?"
FOLLOW_UP = "And what is the namespace made of?"
TOL = {
    "float32_paths": 1e-4,  # restored pages (saved from the first ask's prefill) vs one fresh prefill, float32
    "bf16_kernels": 6e-2,  # the same in bf16 through the Triton kernels: chunking changes bf16 rounding order
}


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A 2-layer contextual TPA model trained for 40 CPU steps on the test corpus, saved as a T6 folder."""
    from corpus_texts import CACHE_DOC, MODEL_CODE, NOTES

    from tpa_core.training.data import VOCAB_SIZE, TokenData, byte_tokenizer
    from tpa_core.training.export import save_t6_checkpoint
    from tpa_core.training.trainer import TrainConfig, Trainer
    from tpa_core.training.variants import (
        ModelShape,
        Variant,
        attention_params,
        cache_bytes,
        tpa_config,
    )

    config = tpa_config(ModelShape(d_model=64, n_layers=2, head_dim=16, vocab_size=VOCAB_SIZE, context=2048),
                        "contextual", n_heads=4)
    variant = Variant("tpa", config, attention_params(config), cache_bytes(config))
    data = TokenData.from_texts([CACHE_DOC, MODEL_CODE, NOTES] * 2, [CACHE_DOC])
    trainer = Trainer(variant, data, TrainConfig(steps=40, batch_size=4, seq_len=64, lr=1e-2, warmup_steps=4,
                                                 eval_windows=4))
    before = trainer.heldout_loss()
    trainer.train()
    assert trainer.history.points[-1].heldout_loss < before - 1.0  # it learned something
    folder = tmp_path_factory.mktemp("trained") / "tpa-tiny"
    return save_t6_checkpoint(trainer.model, folder, byte_tokenizer())


def _ask_twice_and_check(checkpoint, data_dir, corpus_dir, device: str, backend: str, tol: float) -> None:
    from app.service import ChatService
    from app.settings import Settings

    service = ChatService(Settings(data_dir=data_dir, model=str(checkpoint), device=device,
                                   attention_backend=backend, top_k=3, max_new_tokens=8, temperature=0.0),
                          embedder=HashingEmbedder())
    try:
        loaded = service.loaded  # the app's own loading path: the T6 folder by path
        assert loaded.config.form == "contextual" and loaded.model.attention_backend == backend
        store = service.store
        restores: list[tuple[list[int], int, dict[str, torch.Tensor]]] = []
        original = store.restore

        def spy(namespace, token_ids, cache, *args, **kwargs):
            reused = original(namespace, token_ids, cache, *args, **kwargs)
            restores.append((list(token_ids), reused, cache.export(0, 0, reused)))
            return reused

        store.restore = spy
        service.ingest_paths("docs", [str(corpus_dir)])
        first = service.ask(QUESTION, "docs")
        second = service.ask(FOLLOW_UP, "docs", first.session_id)
        assert first.metrics["reused_tokens"] == 0 and restores[0][1] == 0
        prompt, reused, restored = restores[1]
        assert second.metrics["reused_tokens"] == reused >= 256 and reused < len(prompt)
        layers = loaded.config.n_layers
        assert set(restored) == {f"layers.{i}.{n}" for i in range(layers) for n in ("ak", "bk", "av", "bv")}
        assert restored["layers.0.ak"].shape == (reused, loaded.config.n_heads, loaded.config.k_rank)

        model = loaded.model
        with torch.inference_mode():
            fresh = model.new_cache(capacity=len(prompt))
            fresh_logits = model(torch.tensor([prompt], device=model.device), fresh, last_only=True)[0, -1]
            for key, value in fresh.export(0, 0, reused).items():
                torch.testing.assert_close(restored[key].float(), value.float(), atol=tol, rtol=0, msg=key)
            warm = model.new_cache(capacity=len(prompt))  # the second ask's cache: what the store restored
            warm.import_(restored, seq=0, at=0)
            rest = torch.tensor([prompt[reused:]], device=model.device)
            warm_logits = model(rest, warm, last_only=True)[0, -1]
        torch.testing.assert_close(warm_logits, fresh_logits, atol=tol, rtol=0)
        top2 = fresh_logits.topk(2).values
        if top2[0] - top2[1] > 2 * tol:  # no near-tie: the next token is the same
            assert int(warm_logits.argmax()) == int(fresh_logits.argmax())
    finally:
        service.close()


def test_trained_tpa_restores_contextual_factors_and_matches_a_fresh_prefill(trained_checkpoint, data_dir,
                                                                             corpus_dir):
    _ask_twice_and_check(trained_checkpoint, data_dir, corpus_dir, "cpu", "torch", TOL["float32_paths"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trained_tpa_through_the_flashtpa_kernels(trained_checkpoint, data_dir, corpus_dir):
    _ask_twice_and_check(trained_checkpoint, data_dir, corpus_dir, "cuda", "triton", TOL["bf16_kernels"])
