"""Tiny random models of every supported family, built from config classes, saved locally.

Used by the architecture zoo tests and benchmarks: no hub, real transformers code paths.
"""
from __future__ import annotations

from pathlib import Path

import torch

TINY_VOCAB = [f"w{i}" for i in range(60)]


def word_level_tokenizer(words: list[str], unk: str = "<unk>", bos: str | None = None):
    """A whitespace word-level fast tokenizer over `words` (plus unk/pad/bos specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors
    from transformers import PreTrainedTokenizerFast

    specials = [unk, "<pad>"] + ([bos] if bos else [])
    vocab = {tok: i for i, tok in enumerate(specials + [w for w in words if w not in specials])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Decoding one id at a time should give the bare word; joined decoding puts spaces back.
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    if bos:
        core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token=unk, pad_token="<pad>",
                                   bos_token=bos, model_max_length=4096)


def tiny_config(family: str, vocab_size: int = 64, n_layers: int = 2):
    import transformers as tf

    common = dict(num_hidden_layers=n_layers, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                  vocab_size=vocab_size, max_position_embeddings=128)
    gqa = dict(common, num_key_value_heads=2)
    if family == "gpt2":
        return tf.GPT2Config(n_layer=n_layers, n_embd=32, n_head=4, vocab_size=vocab_size, n_positions=128,
                             bos_token_id=0, eos_token_id=0)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**common)
    if family == "llama":
        return tf.LlamaConfig(**gqa)
    if family == "mistral":
        return tf.MistralConfig(**gqa, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**gqa)
    if family == "qwen3":
        return tf.Qwen3Config(**gqa, head_dim=8)
    if family == "gemma2":
        return tf.Gemma2Config(**gqa, head_dim=8)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**gqa, head_dim=8)
    if family == "qwen3_5":
        # Three Gated DeltaNet layers then one softmax layer, like the real 3:1 hybrid.
        cfg = dict(gqa, num_hidden_layers=max(n_layers, 4))
        return tf.Qwen3_5TextConfig(**cfg, head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                                    linear_key_head_dim=8, linear_value_head_dim=8)
    raise ValueError(family)


ZOO_FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "qwen3_5")


def build_tiny_model(family: str, folder: str | Path, seed: int = 0, n_layers: int = 2) -> Path:
    """Random-weight model + word-level tokenizer saved to `folder` as safetensors/JSON."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    tokenizer = word_level_tokenizer(TINY_VOCAB)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer), n_layers),
                                             attn_implementation="eager")
    with torch.no_grad():  # random init leaves some norms at exactly 0/1; perturb so tests see them
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
