"""Shared fixtures: tiny random models (seconds) and the embedded model (loaded once)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from emolens.models import LoadedModel, wrap_model

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte) with ChatML special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_llama(layers: int = 4, width: int = 32, seed: int = 0, context: int = 512) -> LoadedModel:
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return wrap_model(LlamaForCausalLM(config), tokenizer, name="tiny-llama")


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    return tiny_llama()


@pytest.fixture(scope="session")
def embedded() -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct, loaded once per test session."""
    from emolens.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def embedded_bank(embedded, tmp_path_factory):
    """A real bank of the embedded model for the 12 showcase emotions: the full recipe, in small."""
    from emolens.build import Recipe, build
    from emolens.concepts import showcase
    from emolens.corpus import Corpus, load

    records = load().records
    stories = [r for r in records if r.kind == "story" and r.emotion in showcase()]
    neutral = [r for r in records if r.kind == "neutral"][:60]
    out = tmp_path_factory.mktemp("embedded-bank")
    recipe = Recipe(layers=(embedded.default_layer(),))
    return build(embedded, Corpus(stories + neutral), recipe, out=out, progress=False)


def save_for_cli(folder, tiny: LoadedModel, make_bank):
    """`tiny` saved as a model directory and reloaded from it, plus the bank `make_bank(lm)`
    saved beside it: returns (lm, bank, the CLI's --model/--bank arguments)."""
    from emolens.models import load_model

    tiny.model.save_pretrained(folder / "model")
    tiny.tokenizer.save_pretrained(folder / "model")
    lm = load_model(folder / "model")
    bank = make_bank(lm)
    bank.model = dict(lm.fingerprint)
    bank.save(folder / "bank.safetensors")
    return lm, bank, ["--model", str(folder / "model"), "--bank", str(folder / "bank.safetensors")]


def kill_after_lines(command: list[str], env: dict, results, lines: int, timeout: float) -> int:
    """Start `command`, SIGKILL it once `results` holds `lines` lines (within `timeout` s),
    and return how many lines it had written by then."""
    import signal
    import subprocess
    import time

    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + timeout
    while (
        not results.exists() or len(results.read_text().splitlines()) < lines
    ) and time.time() < deadline:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return len(results.read_text().splitlines())
