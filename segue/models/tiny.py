"""Builds a tiny random-weight Llama model directory that needs no download.

A byte-level BPE tokenizer is trained on a built-in corpus, a chat template is written to
`tokenizer_config.json`, and a `LlamaForCausalLM` is initialised from `seed` (same seed,
same weights, same outputs). The EOS row of `lm_head` is zeroed: EOS then always scores 0
while the best of the other ~1000 random logits is positive, so greedy decoding runs to
`max_tokens`, as the fault tests need.
"""

from __future__ import annotations

import json
from pathlib import Path

from segue.tokenizer import _WORDS

# Tools and tool messages in the hermes format (what `--tool-call-parser hermes` reads): the
# tools as JSON lines in a system turn, an assistant's calls as <tool_call> blocks, a tool's
# answer in <tool_response>. Without tools, a plain role-tagged transcript.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|> You may call these tools. Answer a call as <tool_call>\n"
    '{"name": NAME, "arguments": ARGUMENTS}\n</tool_call>\n<tools>\n'
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<|tool|> <tool_response>\n{{ m['content'] }}\n"
    "</tool_response>\n"
    "{% elif m['role'] == 'assistant' and m.get('tool_calls') %}<|assistant|> "
    "{{ m['content'] or '' }}{% for c in m['tool_calls'] %}<tool_call>\n"
    '{"name": "{{ c[\'function\'][\'name\'] }}", "arguments": '
    "{{ c['function']['arguments'] }}}\n</tool_call>{% endfor %}\n"
    "{% else %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>"]


def build_tokenizer(out: Path, vocab_size: int, max_positions: int = 2048) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [" ".join(_WORDS[i : i + 12]) for i in range(0, len(_WORDS), 3)]
    tok.train_from_iterator(corpus * 4, trainer)
    tok.save(str(out / "tokenizer.json"))
    trained = tok.get_vocab_size()
    if vocab_size > trained:
        # The corpus yields about a thousand tokens; a bigger vocabulary (a real model's
        # output layer and sampling cost) gets entries no merge produces: never in a
        # prompt, but each decodes to text of its own when the model picks it.
        spec = json.loads((out / "tokenizer.json").read_text())
        vocab = spec["model"]["vocab"]
        for i in range(trained, vocab_size):
            vocab[f"<x{i}>"] = i
        (out / "tokenizer.json").write_text(json.dumps(spec))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": max_positions,
                "chat_template": CHAT_TEMPLATE,
                "tokenizer_class": "PreTrainedTokenizerFast",
            },
            indent=2,
        )
    )
    return max(trained, vocab_size)


def build_tiny_llama(
    out_dir: str | Path,
    seed: int = 0,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 2048,
    kv_heads: int | None = None,
    intermediate_size: int | None = None,
) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out, vocab_size, max_positions)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[config.eos_token_id] = 0.0
    model.save_pretrained(out, safe_serialization=True)
    return out
