"""Tiny model files written in the real formats (GGUF via the gguf package, HF folders, official T6 checkpoints),
for the loading, tokenizer, T6 and CLI tests. Nothing here uses the code under test to produce the files, except
where said (a tokenizer.json for HF/T6 folders is written by our GGUF tokenizer builder, checked separately)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ w", "o r", "l l", "Ġ s", "i s"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY = dict(d=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=96, context=64, rope_theta=10000.0, eps=1e-5)


def byte_alphabet() -> list[str]:
    """GPT-2's byte -> character map, written out independently of tpa_core.tokenizer."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, llama.cpp token types, merges): 3 control tokens, 256 byte tokens, one token per merge."""
    tokens = list(SPECIALS) + byte_alphabet() + [m.replace(" ", "") for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, list(MERGES)


def random_hf_llama_state(vocab: int, *, qkv_bias: bool = False, tied: bool = True, seed: int = 0,
                          dims: dict | None = None) -> dict[str, torch.Tensor]:
    """A random Llama/Qwen2-shaped HF state dict (float32)."""
    c = dict(TINY, **(dims or {}))
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.08):
        return torch.randn(*shape, generator=g) * std

    d, H, G, D, F = c["d"], c["heads"], c["kv_heads"], c["head_dim"], c["ffn"]
    sd = {"model.embed_tokens.weight": rnd(vocab, d, std=0.5), "model.norm.weight": 1 + rnd(d)}
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + rnd(d)
        sd[p + "post_attention_layernorm.weight"] = 1 + rnd(d)
        sd[p + "self_attn.q_proj.weight"] = rnd(H * D, d)
        sd[p + "self_attn.k_proj.weight"] = rnd(G * D, d)
        sd[p + "self_attn.v_proj.weight"] = rnd(G * D, d)
        sd[p + "self_attn.o_proj.weight"] = rnd(d, H * D)
        sd[p + "mlp.gate_proj.weight"] = rnd(F, d)
        sd[p + "mlp.up_proj.weight"] = rnd(F, d)
        sd[p + "mlp.down_proj.weight"] = rnd(d, F)
        if qkv_bias:
            sd[p + "self_attn.q_proj.bias"] = rnd(H * D, std=0.3)
            sd[p + "self_attn.k_proj.bias"] = rnd(G * D, std=0.3)
            sd[p + "self_attn.v_proj.bias"] = rnd(G * D, std=0.3)
    if not tied:
        sd["lm_head.weight"] = rnd(vocab, d, std=0.3)
    return sd


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's Q/K permutation (rotate_half pairs -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def write_tiny_gguf(path: Path, *, arch: str = "llama", qtype: str = "F32", seed: int = 0,
                    chat_template: str | None = CHATML_TEMPLATE, pre: str = "smollm", tied: bool = True,
                    context: int | None = None, extra_tensors: dict[str, np.ndarray] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Write a tiny llama/qwen2 GGUF as llama.cpp's converter would; returns the HF state dict it holds
    (before quantization)."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    c = TINY
    tokens, types, merges = tiny_vocab()
    sd = random_hf_llama_state(len(tokens), qkv_bias=arch == "qwen2", tied=tied, seed=seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_context_length(context or c["context"])
    w.add_embedding_length(c["d"])
    w.add_block_count(c["layers"])
    w.add_feed_forward_length(c["ffn"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["eps"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    quant = getattr(Q, qtype)
    for name, tensor in sd.items():
        array = tensor.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            target = "token_embd.weight"
        elif name == "model.norm.weight":
            target = "output_norm.weight"
        elif name == "lm_head.weight":
            target = "output.weight"
        else:
            layer, rest = name[len("model.layers."):].split(".", 1)
            module, suffix = rest.rsplit(".", 1)
            target = f"blk.{layer}.{_GGUF_NAMES[module]}.{suffix}"
            if arch == "llama" and module == "self_attn.q_proj":
                array = llama_cpp_permute(array, c["heads"])
            elif arch == "llama" and module == "self_attn.k_proj":
                array = llama_cpp_permute(array, c["kv_heads"])
        if array.ndim == 2 and quant != Q.F32:
            w.add_tensor(target, quants.quantize(array, quant), raw_dtype=quant)
        else:
            w.add_tensor(target, array)
    for name, array in (extra_tensors or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sd


def write_tokenizer_files(folder: Path, *, chat_template: str | None = CHATML_TEMPLATE) -> None:
    """tokenizer.json (+ tokenizer_config.json) of the tiny byte-level vocabulary, for HF and T6 folders."""
    from tpa_core.tokenizer import Tokenizer

    tokens, types, merges = tiny_vocab()
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
    Tokenizer.from_gguf_metadata(meta).backend.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
              "unk_token": "<|endoftext|>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def t6_config(*, vocab: int | None = None, n_layer: int = 2, n_head: int = 5, head_dim: int = 16,
              n_embd: int = 48, rank: int = 2, q_rank: int = 6, block_size: int = 64) -> dict:
    """An official T6 config.json (GPTConfig.save_pretrained writes these keys, model_type "gpt2")."""
    vocab = vocab or len(tiny_vocab()[0])
    return {"model_type": "gpt2", "architectures": ["GPT"], "vocab_size": vocab, "n_layer": n_layer,
            "n_head": n_head, "head_dim": head_dim, "n_embd": n_embd, "rank": rank, "q_rank": q_rank,
            "block_size": block_size, "bias": False, "dropout": 0.0, "scale_attn_by_inverse_layer_idx": False,
            "using_groupnorm": False, "transformers_version": "4.46.0"}


def t6_state_dict(config: dict, *, kv_only: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the official T6 parameter names (tied wte / lm_head share one tensor)."""
    g = torch.Generator().manual_seed(seed)
    d, H, D, R, RQ = config["n_embd"], config["n_head"], config["head_dim"], config["rank"], config["q_rank"]
    F = int(8 / 3 * d)  # math.floor(8 / 3 * n_embd), as the official MLP computes it

    def rnd(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    wte = rnd(config["vocab_size"], d, std=0.5)
    sd = {"transformer.wte.weight": wte, "lm_head.weight": wte}
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}."
        if kv_only:
            sd[p + "attn.c_qkv.c_q.weight"] = rnd(H * D, d)
        else:
            sd[p + "attn.c_qkv.W_A_q.weight"] = rnd(H * RQ, d, std=0.3)
            sd[p + "attn.c_qkv.W_B_q.weight"] = rnd(RQ * D, d, std=0.3)
        sd[p + "attn.c_qkv.W_A_k.weight"] = rnd(H * R, d, std=0.3)
        sd[p + "attn.c_qkv.W_A_v.weight"] = rnd(H * R, d, std=0.3)
        sd[p + "attn.c_qkv.W_B_k.weight"] = rnd(R * D, d, std=0.3)
        sd[p + "attn.c_qkv.W_B_v.weight"] = rnd(R * D, d, std=0.3)
        sd[p + "attn.c_proj.weight"] = rnd(d, H * D)
        sd[p + "mlp.c_fc1.weight"] = rnd(F, d)
        sd[p + "mlp.c_fc2.weight"] = rnd(F, d)
        sd[p + "mlp.c_proj.weight"] = rnd(d, F)
    return sd


def write_t6_checkpoint(folder: Path, *, kv_only: bool, seed: int = 0, tokenizer: bool = False,
                        **config_overrides) -> tuple[dict, dict[str, torch.Tensor]]:
    """An official-format T6 checkpoint folder: config.json + pytorch_model.bin (torch.save of the state dict)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = t6_config(**config_overrides)
    sd = t6_state_dict(config, kv_only=kv_only, seed=seed)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(sd, folder / "pytorch_model.bin")
    if tokenizer:
        write_tokenizer_files(folder, chat_template=None)
    return config, sd
