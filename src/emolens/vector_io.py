"""Steering-vector files: llama.cpp control vectors (GGUF), or plain npz / safetensors arrays.

A vector is stored in the units added to the residual stream: `strength * mean_norm(layer) *
unit_vector`, so llama.cpp's `--control-vector-scaled FILE S` multiplies every strength by S.
With the default strength of 1.0 per emotion, S is then the emolens strength itself.

Layer convention (checked against llama.cpp's `common_control_vector_load` and
`llama_adapter_cvec`): the tensor "direction.N" is added to the output of llama.cpp's layer
il = N, counted from 0 — the output of decoder block N, which is emolens layer N and Hugging
Face `hidden_states[N + 1]`. Index 0 is rejected by llama.cpp, so block 0 cannot be exported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from emolens.atomic import atomic_path
from emolens.errors import EmolensError

FORMATS = ("llama-cpp", "npz", "safetensors")
SUFFIXES = {".gguf": "llama-cpp", ".npz": "npz", ".safetensors": "safetensors"}
ARCH = "controlvector"
PREFIX = "direction."
META_KEY = "emolens.metadata"
CONVENTION = "direction.N is added to the output of decoder block N (0-based)"


def write(
    vectors: Mapping[int, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping,
    format: str | None = None,
) -> Path:
    """Write `vectors` in `format` (default: from the file suffix), atomically."""
    format = format or SUFFIXES.get(Path(path).suffix.lower())
    if format not in FORMATS:
        raise EmolensError(
            f"{path}: unknown export format; use --format {', '.join(FORMATS)} "
            f"or a {', '.join(SUFFIXES)} file name"
        )
    metadata = {**metadata, "layers": sorted(vectors), "convention": CONVENTION}
    if format == "llama-cpp":
        model = metadata.get("model") or {}
        hint = str(model.get("model_type") or model.get("name") or "")
        return write_gguf(vectors, path, model_hint=hint, metadata=metadata)
    return write_arrays(vectors, path, metadata, format)


def write_gguf(
    vectors: Mapping[int, torch.Tensor],
    path: str | os.PathLike,
    *,
    model_hint: str,
    metadata: Mapping | None = None,
) -> Path:
    """A llama.cpp control-vector GGUF: arch "controlvector", one F32 tensor "direction.N"
    per layer N (a decoder block index, N >= 1), written atomically."""
    from gguf import GGUFWriter

    if not vectors:
        raise EmolensError("no layers to export")
    if 0 in vectors:
        raise EmolensError(
            "llama.cpp cannot apply a control vector to the output of block 0 "
            "(direction.0 is rejected): choose layers >= 1"
        )

    def dump(staging: Path) -> None:
        writer = GGUFWriter(str(staging), ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint)
        writer.add_int32(f"{ARCH}.layer_count", len(vectors))
        if metadata is not None:
            writer.add_string(META_KEY, json.dumps(metadata))
        for layer in sorted(vectors):
            writer.add_tensor(f"{PREFIX}{layer}", _array(vectors[layer]))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return _atomic(path, dump)


def write_arrays(
    vectors: Mapping[int, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping,
    format: str = "safetensors",
) -> Path:
    """Plain arrays "direction.N" [width] with the metadata as JSON (npz: a "metadata" string
    array; safetensors: the "emolens" header entry), written atomically."""
    arrays = {f"{PREFIX}{layer}": _array(vector) for layer, vector in sorted(vectors.items())}
    text = json.dumps(metadata)
    if format == "npz":

        def dump(staging: Path) -> None:
            with open(staging, "wb") as handle:
                np.savez(handle, metadata=np.array(text), **arrays)  # type: ignore[arg-type]

    elif format == "safetensors":
        from safetensors.numpy import save_file

        def dump(staging: Path) -> None:
            save_file(arrays, str(staging), metadata={"emolens": text})

    else:
        raise EmolensError(f"unknown array format '{format}': choose npz or safetensors")
    return _atomic(path, dump)


def read(path: Path) -> tuple[dict[int, torch.Tensor], dict]:
    """Vectors {layer: [width]} and the emolens metadata ({} for a foreign GGUF) of a
    control-vector GGUF, npz or safetensors file."""
    if not path.is_file():
        raise EmolensError(f"{path}: no such control-vector file")
    format = SUFFIXES.get(path.suffix.lower())
    try:
        if format == "llama-cpp":
            named, metadata = _read_gguf(path)
        elif format == "npz":
            with np.load(path, allow_pickle=False) as data:
                named = {key: data[key] for key in data.files if key != "metadata"}
                metadata = json.loads(str(data["metadata"])) if "metadata" in data.files else {}
        elif format == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as handle:
                named = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
                metadata = json.loads((handle.metadata() or {}).get("emolens", "{}"))
        else:
            raise EmolensError(f"{path}: expected a .gguf, .npz or .safetensors file")
    except EmolensError:
        raise
    except Exception as error:  # readers raise many types on corrupt files
        raise EmolensError(f"{path}: unreadable control-vector file ({error})") from None
    vectors = {}
    for name, array in named.items():
        layer = name.removeprefix(PREFIX)
        if not name.startswith(PREFIX) or not layer.isdigit() or np.ndim(array) != 1:
            raise EmolensError(f"{path}: '{name}' is not a control-vector tensor direction.N")
        vectors[int(layer)] = torch.from_numpy(np.array(array, dtype=np.float32))
    if not vectors:
        raise EmolensError(f"{path}: no direction tensors")
    return dict(sorted(vectors.items())), metadata


def _read_gguf(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = _field_string(reader, "general.architecture")
    if arch != ARCH:
        raise EmolensError(f"{path}: GGUF architecture is '{arch}', not a control vector")
    text = _field_string(reader, META_KEY)
    named = {tensor.name: np.asarray(tensor.data).reshape(-1) for tensor in reader.tensors}
    return named, json.loads(text) if text else {}


def _field_string(reader, key: str) -> str | None:  # noqa: ANN001
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _array(vector: torch.Tensor) -> np.ndarray:
    vector = torch.as_tensor(vector).detach().float().cpu()
    if vector.dim() != 1:
        raise EmolensError(f"a control vector must be one-dimensional, not {list(vector.shape)}")
    return np.ascontiguousarray(vector.numpy())


def _atomic(path: str | os.PathLike, dump) -> Path:  # noqa: ANN001
    """Run `dump(staging)` on a temporary file beside `path`, then rename it into place."""
    with atomic_path(path) as staging:
        dump(staging)
    return Path(path)
