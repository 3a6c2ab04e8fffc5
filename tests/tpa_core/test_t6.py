"""Official T6 checkpoints (TPA and KV-only) load and match a forward written here from the paper's equations.

The reference below shares nothing with tpa_core: it reads the official parameter names and computes, in float64,
pre-norm RMSNorm without a weight (eps = float32 machine epsilon, F.rms_norm's default), A/B factors per token,
T6's half-split RoPE rotation by -theta on B_Q/B_K (or q), with cos/sin tables rounded to bfloat16 as the
official `Rotary` keeps them, Q = A_Q B_Q / R_Q, K = A_K B_K / R_K, V = A_V B_V / R_V, causal softmax attention
scaled by 1/sqrt(D), SwiGLU silu(c_fc1 x) * c_fc2 x, a final RMSNorm and the tied head.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from engine_fixtures import write_t6_checkpoint

from tpa_core.config import TPAConfig
from tpa_core.convert import t6_to_tpa
from tpa_core.errors import TPAError
from tpa_core.generate import GenerationConfig, generate
from tpa_core.loading import load_model, resolve_source

TOL = 1e-4  # float32 engine vs float64 reference, logits of magnitude ~1-10, two layers


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)


def _t6_rope(x: torch.Tensor) -> torch.Tensor:
    """x [T, K, D]: pairs (i, i + D/2) rotated by -theta_t,i; y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos."""
    T, _, D = x.shape
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    angles = torch.outer(torch.arange(T).float(), inv_freq)  # [T, D/2]
    cos = angles.cos().bfloat16().double()[:, None, :]
    sin = angles.sin().bfloat16().double()[:, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


def t6_reference_logits(sd: dict[str, torch.Tensor], cfg: dict, ids: list[int]) -> torch.Tensor:
    """Logits [T, V] (float64) of the official T6 model (TPA or KV-only, by its weights) for token ids."""
    w = {k: v.double() for k, v in sd.items()}
    H, D, R, RQ = cfg["n_head"], cfg["head_dim"], cfg["rank"], cfg["q_rank"]
    T = len(ids)
    x = w["transformer.wte.weight"][torch.tensor(ids)]  # [T, d]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        h = _rms(x)
        if p + "attn.c_qkv.c_q.weight" in w:  # KV-only: ordinary query, RoPE on q
            q = _t6_rope((h @ w[p + "attn.c_qkv.c_q.weight"].T).view(T, H, D))
        else:
            a_q = (h @ w[p + "attn.c_qkv.W_A_q.weight"].T).view(T, H, RQ)
            b_q = _t6_rope((h @ w[p + "attn.c_qkv.W_B_q.weight"].T).view(T, RQ, D))
            q = torch.einsum("thr,trd->thd", a_q, b_q) / RQ
        a_k = (h @ w[p + "attn.c_qkv.W_A_k.weight"].T).view(T, H, R)
        b_k = _t6_rope((h @ w[p + "attn.c_qkv.W_B_k.weight"].T).view(T, R, D))
        a_v = (h @ w[p + "attn.c_qkv.W_A_v.weight"].T).view(T, H, R)
        b_v = (h @ w[p + "attn.c_qkv.W_B_v.weight"].T).view(T, R, D)
        k = torch.einsum("thr,trd->thd", a_k, b_k) / R
        v = torch.einsum("thr,trd->thd", a_v, b_v) / R
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(D)
        scores = scores.masked_fill(~causal, float("-inf"))
        y = torch.einsum("hts,shd->thd", torch.softmax(scores, dim=-1), v).reshape(T, H * D)
        x = x + y @ w[p + "attn.c_proj.weight"].T
        h = _rms(x)
        x = x + (torch.nn.functional.silu(h @ w[p + "mlp.c_fc1.weight"].T) * (h @ w[p + "mlp.c_fc2.weight"].T)) \
            @ w[p + "mlp.c_proj.weight"].T
    return _rms(x) @ w["lm_head.weight"].T


IDS = [5, 77, 203, 14, 14, 160, 9, 250, 31, 1, 42, 99, 7]


@pytest.mark.parametrize("kv_only", [False, True], ids=["tpa", "kv_only"])
def test_t6_checkpoint_matches_paper_forward(tmp_path, kv_only):
    config, sd = write_t6_checkpoint(tmp_path / "t6", kv_only=kv_only)
    loaded = load_model(tmp_path / "t6", tmp_path / "models", device="cpu", require_tokenizer=False)
    assert loaded.tokenizer is None
    assert loaded.config.form == ("kv_only" if kv_only else "contextual")
    assert loaded.config.q_rank == (0 if kv_only else config["q_rank"])
    with torch.inference_mode():
        ours = loaded.model(torch.tensor([IDS]))[0].double()  # [T, V]
    reference = t6_reference_logits(sd, config, IDS)
    assert (ours - reference).abs().max().item() < TOL


@pytest.mark.parametrize("kv_only", [False, True], ids=["tpa", "kv_only"])
def test_t6_greedy_decoding_through_the_cache(tmp_path, kv_only):
    """Decoding step by step through the factor cache picks the tokens the full reference forward picks."""
    config, sd = write_t6_checkpoint(tmp_path / "t6", kv_only=kv_only, seed=3)
    loaded = load_model(tmp_path / "t6", tmp_path / "models", device="cpu", require_tokenizer=False)

    class IdsOnly:  # generation needs only decode(); a T6 folder without tokenizer.json runs on raw ids
        eos_token_ids = ()

        def decode(self, ids):
            return " ".join(map(str, ids))

    events = list(generate(loaded.model, IdsOnly(), IDS[:5], GenerationConfig(max_new_tokens=8)))
    ours = [t for e in events for t in e.token_ids]
    ids = list(IDS[:5])
    for _ in range(8):
        ids.append(int(t6_reference_logits(sd, config, ids)[-1].argmax()))
    assert ours == ids[5:]


def test_t6_folder_is_not_routed_as_gpt2(tmp_path):
    write_t6_checkpoint(tmp_path / "t6", kv_only=False)
    source = resolve_source(tmp_path / "t6", tmp_path / "models")
    assert source.kind == "t6"


def test_t6_tokenizer_is_required_unless_waived(tmp_path):
    write_t6_checkpoint(tmp_path / "t6", kv_only=False)
    with pytest.raises(TPAError, match="no tokenizer found.*tokenizer.json"):
        load_model(tmp_path / "t6", tmp_path / "models", device="cpu")


def test_t6_with_tokenizer_json(tmp_path):
    write_t6_checkpoint(tmp_path / "t6", kv_only=True, tokenizer=True)
    loaded = load_model(tmp_path / "t6", tmp_path / "models", device="cpu")
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("the wall")) == "the wall"
    assert loaded.chat_template is None


def test_t6_conversion_errors(tmp_path):
    config, sd = write_t6_checkpoint(tmp_path / "t6", kv_only=False)
    tpa = TPAConfig.from_t6_config(config, kv_only=False)
    with pytest.raises(TPAError, match="unexpected weights.*subln"):
        t6_to_tpa(dict(sd, **{"transformer.h.0.attn.subln.weight": torch.ones(16)}), tpa)
    broken = dict(sd)
    broken["transformer.h.1.mlp.c_fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(TPAError, match="shape"):
        t6_to_tpa(broken, tpa)
    with pytest.raises(TPAError, match="missing"):
        t6_to_tpa(sd, TPAConfig.from_t6_config(config, kv_only=True))  # TPA weights, KV-only config
    untied = dict(sd, **{"lm_head.weight": sd["lm_head.weight"] + 1})
    with pytest.raises(TPAError, match="differ"):
        t6_to_tpa(untied, tpa)


def test_t6_groupnorm_config_is_refused(tmp_path):
    write_t6_checkpoint(tmp_path / "t6", kv_only=False)
    path = tmp_path / "t6" / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), using_groupnorm=True)))
    with pytest.raises(TPAError, match="using_groupnorm"):
        load_model(tmp_path / "t6", tmp_path / "models", device="cpu", require_tokenizer=False)


def test_damaged_t6_weights(tmp_path):
    write_t6_checkpoint(tmp_path / "t6", kv_only=False)
    (tmp_path / "t6" / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(TPAError, match="not a readable PyTorch checkpoint"):
        load_model(tmp_path / "t6", tmp_path / "models", device="cpu", require_tokenizer=False)
