"""Tiny random models of every supported architecture, built from configs in-process."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 96

_COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS: dict[str, dict] = {
    "llama": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", tie_word_embeddings=False),
    "mistral": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    "gemma": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    "gemma2": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=64),
    "phi3": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0),
    "phi": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, partial_rotary_factor=0.5),
    "gpt2": dict(n_embd=32, n_inner=48, n_layer=2, n_head=4, n_positions=128),
    "gpt_neox": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5, use_parallel_residual=True),
    "opt": dict(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128),
}

ARCHS = sorted(CONFIGS)

# the architecture table's other entries (tests that must cover every supported family)
EXTRA_CONFIGS: dict[str, dict] = {
    arch: dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **kw)
    for arch, kw in {"gemma3_text": dict(head_dim=8), "olmo": {}, "olmo2": {}, "granite": {}}.items()
}
ALL_ARCHS = sorted(CONFIGS | EXTRA_CONFIGS)


def tiny_config(arch: str, **overrides):
    kw = dict(_COMMON)
    kw.update(CONFIGS[arch] if arch in CONFIGS else EXTRA_CONFIGS[arch])
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


def tiny_model(arch: str, seed: int = 0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    # random init is small; widen the spread so activations are varied
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model.eval()


class CharTokenizer:
    """Minimal stand-in tokenizer for profiler tests (HF-like call signature)."""

    pad_token_id = 0
    eos_token_id = 2
    bos_token_id = 1
    padding_side = "right"

    def __call__(self, texts, add_special_tokens=True, truncation=False, **kw):
        ids = [([1] if add_special_tokens else []) + [3 + (ord(c) % (VOCAB - 3)) for c in t] for t in texts]
        return {"input_ids": ids}


def char_tokenizer():
    """A real HF fast tokenizer (character vocabulary) matching VOCAB, saved with the tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 32 + VOCAB - 4)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(chars)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")


def save_tiny(arch: str, path, seed: int = 0, dtype=torch.float32, **overrides):
    model = tiny_model(arch, seed=seed, dtype=dtype, **overrides)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return model


def tiny_gguf(path, seed: int = 0, hidden: int = 32, layers: int = 2, d_ff: int = 48, heads: int = 4, vocab: int = 64):
    """A tiny float32 Llama written as a GGUF file (``gguf.GGUFWriter``; byte tokens with a SentencePiece
    vocabulary), which transformers reads as it reads a real one: a GGUF model input in milliseconds."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(d_ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(vocab - 3)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [6] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(vocab, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", rand(vocab, hidden))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", rand(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(d_ff, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(d_ff, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(hidden, d_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
