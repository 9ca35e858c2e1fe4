"""Tiny random-weight Hugging Face checkpoints of the Llama family, built with `transformers`
(a dev dependency) and `tokenizers` at fixed seeds: what a downloaded checkpoint looks like,
at a size CI affords. Used by bench/llm_engine.py and tests/node_agent/test_hf_llama.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A ChatML-style template with a BOS, a trim filter, a loop and raise_exception."""
SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "edge nodes serve models close to their users",
    "a paged key value cache shares prompt prefixes between requests",
    "hello world, how are you today? fine, thank you!",
    "Grüße aus Köln: ünïcödé text stays whole when streamed",
    "numbers 0123456789 and punctuation .,;:!? are tokens too",
] * 4


def write_tokenizer(directory: Path, vocab_size: int = 320) -> int:
    """A byte-level BPE tokenizer (BOS added by its post-processor, as Llama's) with a chat
    template in tokenizer_config.json; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE, "model_max_length": 4096}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return int(tok.get_vocab_size())


def hf_config(family: str, vocab_size: int, **overrides: Any) -> Any:
    """A transformers config of `family` ('llama', 'qwen2', 'mistral'): 2 layers, hidden 64,
    4 heads over 2 KV heads (grouped-query attention); EOS is '</s>' (id 2)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    kw: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6,
    )  # fmt: skip
    if family == "llama":
        kw["rope_scaling"] = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
        kw["rope_theta"] = 50000.0
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family]
    return cls(**{**kw, **overrides})


def write_checkpoint(
    directory: Path, family: str, seed: int = 0, max_shard_size: str | None = None, **overrides: Any
) -> Any:
    """Save a random-weight checkpoint of `family` (plus tokenizer) into `directory`; every
    parameter is drawn from the seed (norm weights around 1, biases non-zero, so that no
    part of the computation is trivially the identity). Returns the transformers model."""
    from transformers import AutoModelForCausalLM

    vocab = write_tokenizer(directory)
    torch.manual_seed(seed)
    vocab = overrides.pop("vocab_size", vocab)  # a larger (padded) vocabulary, as real models have
    model = AutoModelForCausalLM.from_config(hf_config(family, vocab, **overrides))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else noise * (0.02 if "bias" in name else 0.08))
    model.eval()
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kw)
    return model
