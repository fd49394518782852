"""`emolens serve` on the embedded SmolLM2-135M-Instruct with a real (small) bank: the streamed
readout equals in-process live reading, steering moves it, and a guard can steer a reply."""

from __future__ import annotations

import pytest

from emolens.readout import generate

from .test_serve import client, health, running_server

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": "My code keeps failing and the deadline is tonight."}]


def test_embedded_server_matches_in_process_reading(embedded, embedded_bank, tmp_path):
    bank_file = embedded_bank.save(tmp_path / "bank.safetensors")
    with running_server(["--bank", str(bank_file)], tmp_path / "server.log", timeout=600) as url:
        api = client(url)
        model = health(url)["model"]
        assert model == embedded.name

        def stream(extension):
            chunks = list(api.chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=24, temperature=0, stream=True,
                extra_body={"emolens": {"read": ["calm", "desperate", "top:3"], **extension}},
            ))  # fmt: skip
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            return text, [c.model_extra["emolens"] for c in chunks]

        text, extras = stream({})
        assert text.strip() and extras[-1]["layer"] == embedded_bank.default_layer
        live = list(generate(embedded, embedded_bank, MESSAGES, max_new_tokens=24))
        assert text == "".join(t.text for t in live)
        for name in ("calm", "desperate"):
            index = embedded_bank.emotion_index(name)
            served = [e["scores"][name] for e in extras[:-1]]
            assert served == pytest.approx([float(t.scores[index]) for t in live], abs=1e-3)

        _, calmer = stream({"steer": {"calm": 0.1}})
        assert calmer[-1]["means"]["calm"] > extras[-1]["means"]["calm"]

        rule = {"when": "calm", "below": 1e6, "window": 4, "then": {"steer": {"calm": 0.1}}}
        _, guarded = stream({"guard": rule})
        fired = [e["guard"] for e in guarded[:-1] if "guard" in e]
        assert [(f["index"], f["action"]) for f in fired] == [(3, "steer")]
        served = [e["scores"]["calm"] for e in guarded[:-1]]
        plain = [e["scores"]["calm"] for e in extras[:-1]]
        assert served[:4] == pytest.approx(plain[:4], abs=1e-3)
        assert sum(served[5:]) / len(served[5:]) > sum(plain[5:]) / len(plain[5:])
