import pytest
import torch
import transformers as tf

from emolens.chat import plain_chat
from emolens.errors import EmolensError
from emolens.models import find_layers, load_model, wrap_model

from .conftest import byte_tokenizer

SMALL = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, vocab_size=300)


def _text(**extra):
    return dict(SMALL, num_hidden_layers=3, num_key_value_heads=1, **extra)


ARCHITECTURES = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_text())),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**_text())),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_text())),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**_text(head_dim=8))),
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**_text(head_dim=8))),
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**_text(head_dim=8))),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**_text(pad_token_id=0))),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=300)),
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**_text())),
    "gemma3_multimodal": lambda: tf.Gemma3ForConditionalGeneration(
        tf.Gemma3Config(
            text_config=_text(head_dim=8),
            vision_config=dict(
                hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, image_size=28, patch_size=14,
            ),
            mm_tokens_per_image=4,
        )
    ),
}  # fmt: skip


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_layer_discovery_finds_the_text_decoder(arch):
    model = ARCHITECTURES[arch]()
    path, layers = find_layers(model)
    assert len(layers) == 3
    assert "vision" not in path
    lm = wrap_model(model, byte_tokenizer(), name=arch)
    assert lm.depth == 3 and lm.width == 16
    assert lm.fingerprint["weights"] and lm.fingerprint["architecture"] == type(model).__name__


def test_layer_override_and_clear_error_listing_candidates():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.ReLU()])

    with pytest.raises(EmolensError, match="cannot find the decoder blocks.*stack"):
        find_layers(Odd())
    model = ARCHITECTURES["llama"]()
    assert find_layers(model, "model.layers")[0] == "model.layers"
    with pytest.raises(EmolensError, match="no module list at 'model.blocks'.*model.layers"):
        find_layers(model, "model.blocks")


def test_fingerprint_tracks_weights():
    a, b = ARCHITECTURES["llama"](), ARCHITECTURES["llama"]()
    tok = byte_tokenizer()
    assert wrap_model(a, tok).fingerprint["weights"] != wrap_model(b, tok).fingerprint["weights"]
    b.load_state_dict(a.state_dict())
    assert wrap_model(a, tok).fingerprint["weights"] == wrap_model(b, tok).fingerprint["weights"]


def test_plain_chat_fallback_format():
    text = plain_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}])
    assert text == "Human: Hi\n\nAssistant: Yes\n\nAssistant:"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no/such/thing/here", "unknown model"),
        ("/nonexistent/model.gguf", "no such GGUF file"),
        ("not a model", "unknown model"),
    ],
)
def test_bad_specs_give_one_clear_error(spec, message):
    with pytest.raises(EmolensError, match=message):
        load_model(spec)


def test_corrupt_gguf_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOLENS_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(EmolensError, match="broken.gguf: not a readable GGUF model"):
        load_model(bad)
    assert not any((tmp_path / "cache").rglob("config.json"))


def test_hub_id_honours_offline_mode(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EmolensError, match="cannot load model 'nobody/nothing'"):
        load_model("nobody/nothing")


@pytest.mark.slow
def test_embedded_model_loads_offline(embedded):
    assert (embedded.depth, embedded.width) == (30, 576)
    assert embedded.has_chat_template
    assert embedded.default_layer() == 20
    assert embedded.fingerprint["source"].startswith("gguf:")


def test_bad_devices_and_corrupt_weights_are_clear_errors(tmp_path):
    from tests.conftest import tiny_llama

    for device, match in [("bogus", "unknown device"), ("cuda:7", "not available|only"),
                          ("cuda", "not available|only")]:  # fmt: skip
        if (
            device.startswith("cuda")
            and torch.cuda.is_available()
            and torch.cuda.device_count() > 7
        ):
            continue
        with pytest.raises(EmolensError, match=match):
            load_model(tmp_path, device=device)
    lm = tiny_llama()
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(EmolensError, match="unreadable weights"):
        load_model(tmp_path / "m")
