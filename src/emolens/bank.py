"""EmotionBank: emotion vectors [layer, emotion, width] with the metadata that makes them safe."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from emolens.atomic import atomic_path
from emolens.errors import EmolensError

if TYPE_CHECKING:
    from emolens.steer import SteeringVector

VARIANTS = ("denoised", "raw")  # every bank has these
OPTIONAL_VARIANTS = ("probe",)  # logistic-regression probes, where the build kept its stories
FORMAT_VERSION = 1


@dataclass
class EmotionBank:
    """Emotion vectors per layer, raw (centred emotion means), denoised, and optionally
    `probe` (one-vs-rest logistic-regression directions on the centred story activations).

    `vectors[variant]` is [layers, emotions, width] (not normalised); `mean_norm` is the
    mean residual norm per layer over the build corpus: the unit of steering strength.
    `center` is the mean of all emotion means per layer. `default_layer` is where reading
    and steering happen unless told otherwise (None: the middle bank layer); `kind` says what
    made the bank ("built", "random", ...). `model` is the fingerprint of the model it was
    built from; `meta` keeps provenance (recipe, corpus, build statistics, held-out scores).
    """

    emotions: list[str]
    layers: list[int]
    vectors: dict[str, torch.Tensor]
    mean_norm: torch.Tensor
    center: torch.Tensor
    model: dict = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    default_layer: int | None = None
    kind: str = "built"

    def __post_init__(self) -> None:
        if not self.emotions or not self.layers:
            raise EmolensError("a bank needs at least one emotion and one layer")
        if not all(isinstance(e, str) and e for e in self.emotions):
            raise EmolensError("bank emotion names must be non-empty strings")
        if len(set(self.emotions)) != len(self.emotions):
            raise EmolensError("bank emotion names are not unique")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in self.layers):
            raise EmolensError(f"bank layers must be whole numbers, not {self.layers}")
        shape = (len(self.layers), len(self.emotions))
        for variant in VARIANTS:
            if variant not in self.vectors:
                raise EmolensError(f"bank has no '{variant}' vectors")
        for variant in self.vectors:
            if variant not in VARIANTS + OPTIONAL_VARIANTS:
                raise EmolensError(f"unknown bank variant '{variant}'")
            if tuple(self.vectors[variant].shape[:2]) != shape:
                raise EmolensError(
                    f"bank '{variant}' vectors have shape {tuple(self.vectors[variant].shape)}, "
                    f"expected {shape} + (width,)"
                )
        if tuple(self.mean_norm.shape) != (len(self.layers),):
            raise EmolensError("bank mean_norm must have one value per layer")
        if tuple(self.center.shape) != (len(self.layers), self.width):
            raise EmolensError("bank center must have one vector per layer")
        tensors = {f"{v} vectors": t for v, t in self.vectors.items()}
        for name, tensor in {**tensors, "mean_norm": self.mean_norm, "center": self.center}.items():
            if not bool(torch.isfinite(tensor).all()):
                raise EmolensError(f"bank {name} contain NaN or infinite values")
        if self.default_layer is None:
            self.default_layer = self.layers[len(self.layers) // 2]
        if self.default_layer not in self.layers:
            raise EmolensError(
                f"bank default layer {self.default_layer} is not one of its layers {self.layers}"
            )

    @property
    def width(self) -> int:
        return int(self.vectors["raw"].shape[-1])

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
        if variant not in self.vectors:
            raise EmolensError(f"unknown variant '{variant}': choose from {sorted(self.vectors)}")
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

    def digest(self) -> str:
        """A short digest of what the bank reads and steers with: emotions, layers, vectors
        and norms (not its metadata)."""
        import hashlib

        sha = hashlib.sha256(json.dumps([self.emotions, self.layers]).encode())
        for variant in sorted(self.vectors):
            sha.update(self.vectors[variant].float().contiguous().numpy().tobytes())
        sha.update(self.mean_norm.float().contiguous().numpy().tobytes())
        return sha.hexdigest()[:16]

    def steering(
        self,
        strengths: Mapping[str, float],
        layers: int | Sequence[int] | None = None,
        *,
        variant: str = "denoised",
        allow_strong: bool = False,
    ) -> SteeringVector:
        """The SteeringVector of `{emotion: strength}` at `layers` (None: the default layer);
        a strength is a fraction of the layer's mean residual norm; "random:SEED" names a
        matched-norm random control."""
        from emolens.steer import SteeringVector

        return SteeringVector.from_spec(
            self, strengths, layers, variant=variant, allow_strong=allow_strong
        )

    def check_model(self, lm: Any) -> None:
        """Refuse a model of another width, or (when the bank records one) other weights."""
        if self.width != lm.width:
            raise EmolensError(f"bank vectors have width {self.width}; {lm.name} has {lm.width}")
        if self.model:
            self.check_against(lm)

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
        tensors = {f"vectors.{v}": t.float().contiguous() for v, t in self.vectors.items()}
        tensors["mean_norm"] = self.mean_norm.float().contiguous()
        tensors["center"] = self.center.float().contiguous()
        header = {
            "format": FORMAT_VERSION,
            "emotions": self.emotions,
            "layers": self.layers,
            "default_layer": self.default_layer,
            "kind": self.kind,
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
        except (KeyError, json.JSONDecodeError, RecursionError) as error:
            raise EmolensError(f"{path}: not an emolens bank (metadata {error!r})") from None
        except Exception as error:  # safetensors raises its own error types on corrupt files
            raise EmolensError(f"{path}: unreadable bank file ({error})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
            raise EmolensError(f"{path}: bank format is not {FORMAT_VERSION} (or not a bank)")
        missing = ({f"vectors.{v}" for v in VARIANTS} | {"mean_norm", "center"}) - set(tensors)
        if missing:
            raise EmolensError(f"{path}: bank lacks tensors {sorted(missing)}")
        meta = header.get("meta", {})
        try:
            if not isinstance(meta, dict) or not isinstance(header.get("model", {}), dict):
                raise EmolensError("fields 'meta' and 'model' must be JSON objects")
            if not isinstance(header.get("emotions"), list) or not isinstance(
                header.get("layers"), list
            ):
                raise EmolensError("fields 'emotions' and 'layers' must be lists")
            return cls(
                emotions=list(header["emotions"]),
                layers=list(header["layers"]),
                vectors={k[8:]: t for k, t in tensors.items() if k.startswith("vectors.")},
                mean_norm=tensors["mean_norm"],
                center=tensors["center"],
                model=header.get("model", {}),
                meta=meta,
                default_layer=header.get("default_layer", meta.get("default_layer")),
                kind=str(header.get("kind", meta.get("kind", "built"))),
            )
        except EmolensError as error:
            raise EmolensError(f"{path}: {error}") from None


def default_bank_path(fingerprint: dict) -> Path:
    """Where the default build of a model (shipped corpus, default recipe) is cached."""
    from emolens.models import cache_dir

    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in fingerprint["name"])
    return cache_dir() / "banks" / f"{slug}-{fingerprint['weights']}" / "bank.safetensors"


def keyed_bank_path(fingerprint: dict, key: str) -> Path:
    """Where a build of another corpus or recipe is cached: keyed by its build key, so that
    no build ever replaces the bank of another."""
    import hashlib

    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return default_bank_path(fingerprint).parent / "builds" / digest / "bank.safetensors"


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
        kind="random",
    )
