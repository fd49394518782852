"""Export: llama.cpp control-vector GGUF and npz / safetensors arrays round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from emolens.bank import random_bank
from emolens.cli import main
from emolens.errors import EmolensError
from emolens.steer import SteeringVector, steer, steer_vectors
from emolens.vector_io import write_gguf
from tests.conftest import save_for_cli

EMOTIONS = ["calm", "sad", "happy", "at ease"]


@pytest.fixture(scope="module")
def bank(tiny):
    bank = random_bank(EMOTIONS, list(range(tiny.depth)), tiny.width, norm=2.5, seed=4)
    bank.default_layer = 2
    bank.model = dict(tiny.fingerprint)
    return bank


def emotion_vectors(bank, strengths, layers=None, variant="denoised"):
    return bank.steering(strengths, layers, variant=variant).vectors


def load_control_vector(path):
    return SteeringVector.load(path).vectors


def control_vector_metadata(path):
    return SteeringVector.load(path).meta


def field(reader, key):
    return reader.get_field(key).contents()


def test_gguf_is_a_llama_cpp_control_vector(tiny, bank, tmp_path):
    strengths = {"calm": 0.5, "sad": -0.2}
    path = bank.steering(strengths, [1, 3]).save(tmp_path / "calm.gguf")
    reader = GGUFReader(str(path))
    assert field(reader, "general.architecture") == "controlvector"
    assert field(reader, "controlvector.model_hint") == "llama"
    assert field(reader, "controlvector.layer_count") == 2
    assert sorted(t.name for t in reader.tensors) == ["direction.1", "direction.3"]
    want = emotion_vectors(bank, strengths, [1, 3])
    for tensor in reader.tensors:
        assert tensor.tensor_type == GGMLQuantizationType.F32
        assert tensor.n_elements == tiny.width and len(tensor.shape) == 1
        layer = int(tensor.name.split(".")[1])
        assert np.allclose(np.asarray(tensor.data), want[layer].numpy(), atol=1e-6)
    loaded = load_control_vector(path)
    assert sorted(loaded) == [1, 3]
    assert all(torch.allclose(loaded[k], want[k], atol=1e-6) for k in loaded)
    meta = control_vector_metadata(path)
    assert meta["emotions"] == strengths and meta["layers"] == [1, 3]
    assert meta["model"]["weights"] == tiny.fingerprint["weights"]


@pytest.mark.parametrize("suffix", ["npz", "safetensors"])
def test_arrays_round_trip_with_metadata(tiny, bank, tmp_path, suffix):
    vector = 0.1 * bank.steering({"at ease": 1.0}, variant="raw")
    path = vector.save(tmp_path / f"v.{suffix}")
    vectors = load_control_vector(path)
    want = emotion_vectors(bank, {"at ease": 0.1}, variant="raw")
    assert list(vectors) == [2] and torch.allclose(vectors[2], want[2], atol=1e-6)
    assert float(vectors[2].norm()) == pytest.approx(0.1 * bank.norm_at(2), rel=1e-5)
    meta = control_vector_metadata(path)
    assert meta["emotions"] == {"at ease": pytest.approx(0.1)}
    assert meta["layers"] == [2] and meta["variant"] == "raw"
    assert meta["norms"]["2"] == pytest.approx(2.5)
    assert meta["model"] == tiny.fingerprint


def test_a_loaded_vector_steers_like_the_bank(tiny, bank, tmp_path):
    path = bank.steering({"happy": 0.3}, [1, 2]).save(tmp_path / "h.gguf")
    ids = torch.randint(3, 200, (1, 6))
    with torch.inference_mode():
        with steer(tiny, bank, {"happy": 0.3}, layers=[1, 2]):
            want = tiny.model(input_ids=ids).logits
        with steer_vectors(tiny, load_control_vector(path)):
            got = tiny.model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_export_errors(tiny, bank, tmp_path):
    with pytest.raises(EmolensError, match="block 0"):
        bank.steering({"calm": 1.0}, [0]).save(tmp_path / "a.gguf")
    with pytest.raises(EmolensError, match="unknown export format"):
        bank.steering({"calm": 1.0}).save(tmp_path / "a.txt")
    with pytest.raises(EmolensError, match="no emotions"):
        bank.steering({})
    with pytest.raises(EmolensError, match="no such"):
        load_control_vector(tmp_path / "missing.gguf")
    foreign = tmp_path / "model.gguf"
    writer = GGUFWriter(str(foreign), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(EmolensError, match="not a control vector"):
        load_control_vector(foreign)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(EmolensError, match="unreadable"):
        load_control_vector(tmp_path / "junk.npz")
    assert not list(tmp_path.glob(".export-*"))  # nothing half-written left behind


def test_foreign_gguf_without_metadata_loads(tmp_path):
    path = write_gguf({5: torch.ones(8)}, tmp_path / "plain.gguf", model_hint="llama")
    assert control_vector_metadata(path) == {}
    assert torch.equal(load_control_vector(path)[5], torch.ones(8))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny):
    """The tiny model saved as a local directory, and a bank file made for it."""
    root = tmp_path_factory.mktemp("tiny")

    def make_bank(lm):
        bank = random_bank(EMOTIONS, list(range(lm.depth)), lm.width, norm=2.0)
        bank.default_layer = 2
        return bank

    lm, bank, _ = save_for_cli(root, tiny, make_bank)
    return root, lm, bank


def test_cli_export(saved, tmp_path, capsys):
    root, lm, bank = saved
    out = tmp_path / "calm.gguf"
    options = ["--model", str(root / "model"), "--bank", str(root / "bank.safetensors")]
    code = main(
        ["export", str(out), "--format", "llama-cpp", "--emotion", "calm", "--emotion",
         "sad=-0.5", "--scale", "0.2", "--layers", "1", "--layers", "3", *options]
    )  # fmt: skip
    assert code == 0 and "wrote" in capsys.readouterr().err
    vectors = load_control_vector(out)
    want = emotion_vectors(bank, {"calm": 0.2, "sad": -0.1}, [1, 3])
    assert sorted(vectors) == [1, 3]
    assert all(torch.allclose(vectors[k], want[k], atol=1e-6) for k in (1, 3))
    flat = tmp_path / "flat.npz"
    assert main(["export", "--emotion", "calm=0.2", "--layers", "1,3", *options, str(flat)]) == 0
    assert sorted(load_control_vector(flat)) == [1, 3]
    assert main(["export", str(tmp_path / "x.npz"), "--emotion", "bored", *options]) == 2
    assert "unknown emotion" in capsys.readouterr().err
