"""EmotionBank: emotion vectors [layer, emotion, width] with the metadata that makes them safe."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from emolens.atomic import atomic_path
from emolens.errors import EmolensError

VARIANTS = ("denoised", "raw")
FORMAT_VERSION = 1


@dataclass
class EmotionBank:
    """Emotion vectors per layer, raw (centred emotion means) and denoised.

    `vectors[variant]` is [layers, emotions, width] (not normalised); `mean_norm` is the
    mean residual norm per layer over the build corpus: the unit of steering strength.
    `center` is the mean of all emotion means per layer.
    """

    emotions: list[str]
    layers: list[int]
    vectors: dict[str, torch.Tensor]
    mean_norm: torch.Tensor
    center: torch.Tensor
    model: dict = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = (len(self.layers), len(self.emotions))
        for variant in VARIANTS:
            if variant not in self.vectors:
                raise EmolensError(f"bank has no '{variant}' vectors")
            if tuple(self.vectors[variant].shape[:2]) != shape:
                raise EmolensError(
                    f"bank '{variant}' vectors have shape {tuple(self.vectors[variant].shape)}, "
                    f"expected {shape} + (width,)"
                )
        if len(set(self.emotions)) != len(self.emotions):
            raise EmolensError("bank emotion names are not unique")
        if tuple(self.mean_norm.shape) != (len(self.layers),):
            raise EmolensError("bank mean_norm must have one value per layer")

    @property
    def width(self) -> int:
        return int(self.vectors["raw"].shape[-1])

    @property
    def default_layer(self) -> int:
        """The layer reads and steering use unless told otherwise."""
        return int(self.meta.get("default_layer", self.layers[len(self.layers) // 2]))

    def layer_index(self, layer: int | None) -> int:
        """Position of `layer` (None: the default layer) in `self.layers`."""
        layer = self.default_layer if layer is None else layer
        if layer not in self.layers:
            raise EmolensError(f"layer {layer} is not in this bank (layers: {self.layers})")
        return self.layers.index(layer)

    def emotion_index(self, name: str) -> int:
        if name not in self.emotions:
            raise EmolensError(f"unknown emotion '{name}'; the bank has {len(self.emotions)}")
        return self.emotions.index(name)

    def matrix(self, layer: int | None = None, variant: str = "denoised") -> torch.Tensor:
        """Unit vectors of every emotion at one layer, [emotions, width]."""
        if variant not in VARIANTS:
            raise EmolensError(f"unknown variant '{variant}': choose from {VARIANTS}")
        rows = self.vectors[variant][self.layer_index(layer)]
        return rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)

    def vector(
        self, name: str, layer: int | None = None, variant: str = "denoised"
    ) -> torch.Tensor:
        """The unit vector of one emotion at one layer, [width]."""
        return self.matrix(layer, variant)[self.emotion_index(name)]

    def norm_at(self, layer: int | None = None) -> float:
        """Mean residual norm at `layer`: steering strength 1.0 adds a vector this long."""
        return float(self.mean_norm[self.layer_index(layer)])

    def check_against(self, lm: Any) -> None:
        """Refuse a model other than the one the bank was built from."""
        mine, theirs = self.model, getattr(lm, "fingerprint", {})
        for key in ("depth", "width"):
            if mine.get(key) != theirs.get(key):
                raise EmolensError(
                    f"bank was built for {mine.get('name')} ({key} {mine.get(key)}), "
                    f"not {theirs.get('name')} ({key} {theirs.get(key)})"
                )
        if mine.get("weights") != theirs.get("weights"):
            raise EmolensError(
                f"bank was built for {mine.get('name')} (weights {mine.get('weights')}); "
                f"{theirs.get('name')} has other weights ({theirs.get('weights')})"
            )
        if mine.get("name") != theirs.get("name"):
            warnings.warn(
                f"bank was built for '{mine.get('name')}', used with '{theirs.get('name')}' "
                "(same weights)",
                stacklevel=2,
            )

    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file with JSON metadata, atomically."""
        path = Path(path)
        tensors = {f"vectors.{v}": self.vectors[v].float().contiguous() for v in VARIANTS}
        tensors["mean_norm"] = self.mean_norm.float().contiguous()
        tensors["center"] = self.center.float().contiguous()
        header = {
            "format": FORMAT_VERSION,
            "emotions": self.emotions,
            "layers": self.layers,
            "model": self.model,
            "meta": self.meta,
        }
        with atomic_path(path) as staging:
            save_file(tensors, staging, metadata={"emolens": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EmotionBank:
        """Read and validate a bank written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise EmolensError(f"{path}: no such bank file (build one with `emolens build`)")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = json.loads((handle.metadata() or {})["emolens"])
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except (KeyError, json.JSONDecodeError) as error:
            raise EmolensError(f"{path}: not an emolens bank (metadata {error})") from None
        except Exception as error:  # safetensors raises its own error types on corrupt files
            raise EmolensError(f"{path}: unreadable bank file ({error})") from None
        if header.get("format") != FORMAT_VERSION:
            raise EmolensError(f"{path}: bank format {header.get('format')} is not supported")
        missing = ({f"vectors.{v}" for v in VARIANTS} | {"mean_norm", "center"}) - set(tensors)
        if missing:
            raise EmolensError(f"{path}: bank lacks tensors {sorted(missing)}")
        return cls(
            emotions=list(header["emotions"]),
            layers=[int(layer) for layer in header["layers"]],
            vectors={v: tensors[f"vectors.{v}"] for v in VARIANTS},
            mean_norm=tensors["mean_norm"],
            center=tensors["center"],
            model=header.get("model", {}),
            meta=header.get("meta", {}),
        )


def default_bank_path(fingerprint: dict) -> Path:
    """Where `emolens build` puts a model's bank unless told otherwise."""
    from emolens.models import cache_dir

    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in fingerprint["name"])
    return cache_dir() / "banks" / f"{slug}-{fingerprint['weights']}" / "bank.safetensors"


def random_bank(
    emotions: list[str], layers: list[int], width: int, norm: float = 1.0, seed: int = 0
) -> EmotionBank:
    """A bank of random directions: a control, and a stand-in for tests."""
    generator = torch.Generator().manual_seed(seed)
    shape = (len(layers), len(emotions), width)
    raw = torch.randn(shape, generator=generator)
    return EmotionBank(
        emotions=list(emotions),
        layers=list(layers),
        vectors={"raw": raw, "denoised": raw.clone()},
        mean_norm=torch.full((len(layers),), float(norm)),
        center=torch.zeros(len(layers), width),
        meta={"default_layer": layers[len(layers) // 2], "kind": "random"},
    )
