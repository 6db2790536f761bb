"""Write small GGUF files for offline tests: the tiny Llama (Q8_0, byte tokenizer) or a bare header.

The tiny Llama follows llama.cpp's conversion (q/k rows permuted into its
rotary layout, which transformers permutes back), so transformers loads it as
a LlamaForCausalLM whose weights equal the random model's up to Q8_0 rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.conftest import TINY_LLAMA


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: per head, the two rotary halves interleaved."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_llama_gguf(path: Path, seed: int = 0, architecture: dict[str, Any] = TINY_LLAMA) -> Path:
    """A Q8_0 GGUF of the random tiny Llama (seeded by ``seed``) with the byte tokenizer's vocabulary."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    from qkcore.sources.tokenizer import byte_tokenizer

    spec = dict(architecture)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    weights = {k: v.detach().float().numpy() for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    n_q, n_kv, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q8 = gguf.GGMLQuantizationType.Q8_0

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_q)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_vocab_size(config.vocab_size)

    vocab = byte_tokenizer().get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 3) + [3] * 3)  # normal bytes, then 3 control tokens
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(vocab["<bos>"])
    writer.add_eos_token_id(vocab["<eos>"])
    writer.add_pad_token_id(vocab["<pad>"])
    writer.add_add_bos_token(False)

    def add(name: str, array: np.ndarray, quantize: bool = True) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if quantize:
            data = gguf.quants.quantize(array, q8)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=q8)
        else:
            writer.add_tensor(name, array)

    add("token_embd.weight", weights["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", weights[layer + "input_layernorm.weight"], quantize=False)
        add(f"blk.{i}.ffn_norm.weight", weights[layer + "post_attention_layernorm.weight"], quantize=False)
        add(f"blk.{i}.attn_q.weight", _permute(weights[layer + "self_attn.q_proj.weight"], n_q))
        add(f"blk.{i}.attn_k.weight", _permute(weights[layer + "self_attn.k_proj.weight"], n_kv))
        add(f"blk.{i}.attn_v.weight", weights[layer + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", weights[layer + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_gate.weight", weights[layer + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", weights[layer + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", weights[layer + "mlp.down_proj.weight"])
    add("output_norm.weight", weights["model.norm.weight"], quantize=False)
    if not config.tie_word_embeddings:
        add("output.weight", weights["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_header_only_gguf(path: Path, architecture: str) -> Path:
    """A GGUF with metadata only (no tensors) claiming ``architecture``."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("header-only")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
