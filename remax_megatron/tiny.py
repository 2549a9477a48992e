"""Tiny Hugging Face models and tokenizers built in-process (no downloads): for tests, benchmarks
and the built-in demo. Everything is seeded, so two calls give identical files."""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]

_CORPUS = """
the quick brown fox jumps over the lazy dog . a model learns from rewards and from its own
greedy answer . reinforce with a baseline reduces variance . tensor parallel layers split the
weights , pipeline stages split the layers . hello world , how are you today ? i am fine , thank
you . numbers one two three four five six seven eight nine ten . red green blue yellow black white
cats and dogs play in the garden while birds sing songs in the morning sun .
""".strip()


def build_tokenizer(vocab_size: int = 300, corpus: str | None = None):
    """A byte-level BPE tokenizer trained on a built-in corpus, with pad/bos/eos and a chat
    template. ``len(tokenizer)`` is at most ``vocab_size`` (BPE stops when merges run out)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([corpus or _CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


TINY_SHAPES = {
    "gpt2": dict(n_embd=64, n_layer=4, n_head=4, n_positions=128),
    "llama": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5),
}


# 4 experts, 2 per token; Qwen2-MoE's shared expert and softmax-then-top-k without renormalizing
TINY_MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
                    router_jitter_noise=0.0),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, norm_topk_prob=False),
}


def hf_config(architecture: str, vocab_size: int, **overrides):
    """A tiny transformers config for ``architecture`` (any of the supported classes)."""
    import transformers

    from .models.hf_config import CAUSAL_LM, REWARD

    model_type = {**CAUSAL_LM, **REWARD}[architecture]
    cls = {"gpt2": transformers.GPT2Config, "llama": transformers.LlamaConfig,
           "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config, "mixtral": transformers.MixtralConfig,
           "qwen2_moe": transformers.Qwen2MoeConfig,
           "qwen3_moe": transformers.Qwen3MoeConfig}[model_type]
    shape = dict(TINY_SHAPES["gpt2" if model_type == "gpt2" else "llama"])
    if model_type == "gpt2":
        shape.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if model_type == "mistral":
        shape.update(sliding_window=None)
    if model_type in ("qwen3", "qwen3_moe"):
        shape.update(head_dim=24)  # Qwen3's head_dim is its own, not hidden / heads
    shape.update(TINY_MOE.get(model_type, {}))
    shape.update(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if architecture in REWARD:
        shape.update(num_labels=1)
    shape.update(overrides)
    config = cls(**shape)
    config.architectures = [architecture]
    return config


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Seeded random values in every parameter (norm scales around 1, biases around 0), so a
    conversion test exercises all of them, not just what default init makes non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name or name.split(".")[-2].startswith("ln_"):
                p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(std * noise)
    return model


def build_hf_model(architecture: str, vocab_size: int, seed: int = 0, **overrides):
    """A tiny, randomly initialized transformers model of ``architecture`` (fp32, eval mode)."""
    import transformers

    config = hf_config(architecture, vocab_size, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config)
    return randomize_(model, seed).eval()


def save_hf(model, tokenizer, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    """save_pretrained of model (+ tokenizer when given) into ``directory``."""
    directory = Path(directory)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def build_word_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly ``vocab_size`` ids (<pad> 0, <unk> 1, "w2" ... , <eos> last):
    any id decodes, so a randomly initialized model of a real vocabulary size (GPT-2's 50257) can
    generate and be scored without downloading its tokenizer. Text "w5 w9" is ids [5, 9]."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    # special tokens are matched in raw text first: none may be a prefix of a word ("w1" of "w12")
    vocab["<pad>"] = vocab.pop("w0")
    vocab["<unk>"] = vocab.pop("w1")
    vocab["<eos>"] = vocab.pop(f"w{vocab_size - 1}")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")
