import pytest
import torch

from emolens.bank import EmotionBank, random_bank
from emolens.errors import EmolensError


def make_bank(fingerprint):
    bank = random_bank(["happy", "sad", "at ease"], [1, 2], width=32, norm=5.0)
    bank.model = dict(fingerprint)
    return bank


def test_save_load_roundtrip(tmp_path, tiny):
    bank = make_bank(tiny.fingerprint)
    bank.meta["note"] = {"nested": [1, 2]}
    path = bank.save(tmp_path / "sub" / "bank.safetensors")
    loaded = EmotionBank.load(path)
    assert loaded.emotions == ["happy", "sad", "at ease"] and loaded.layers == [1, 2]
    for variant in ("raw", "denoised"):
        assert torch.equal(loaded.vectors[variant], bank.vectors[variant])
    assert loaded.meta["note"] == {"nested": [1, 2]} and loaded.model == bank.model
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary file left behind


def test_vectors_are_unit_and_named(tiny):
    bank = make_bank(tiny.fingerprint)
    assert torch.allclose(bank.matrix(2).norm(dim=1), torch.ones(3))
    assert torch.allclose(bank.vector("at ease", 1), bank.matrix(1)[2])
    assert bank.norm_at(1) == 5.0
    with pytest.raises(EmolensError, match="unknown emotion 'glad'"):
        bank.vector("glad")
    with pytest.raises(EmolensError, match="layer 9 is not in this bank"):
        bank.matrix(9)


def test_check_against_refuses_another_model(tiny):
    from tests.conftest import tiny_llama

    bank = make_bank(tiny.fingerprint)
    bank.check_against(tiny)
    other = tiny_llama(seed=1)
    with pytest.raises(EmolensError, match="other weights"):
        bank.check_against(other)
    deeper = tiny_llama(layers=5)
    with pytest.raises(EmolensError, match="depth"):
        bank.check_against(deeper)
    renamed = make_bank({**tiny.fingerprint, "name": "a-copy"})
    with pytest.warns(UserWarning, match="same weights"):
        renamed.check_against(tiny)


def test_bad_bank_files_are_named(tmp_path):
    with pytest.raises(EmolensError, match="no such bank file"):
        EmotionBank.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 40)
    with pytest.raises(EmolensError, match="junk.safetensors"):
        EmotionBank.load(junk)
    with pytest.raises(EmolensError, match="shape"):
        EmotionBank(["a"], [1], {"raw": torch.zeros(1, 2, 4), "denoised": torch.zeros(1, 2, 4)},
                    torch.ones(1), torch.zeros(1, 4))  # fmt: skip
