"""Missing packages and corrupt caches give one-line errors that name the fix."""

import pytest

from cdcca.assets import AssetError, load_llm, package_dir


def test_missing_package_names_the_install_command():
    with pytest.raises(AssetError, match="package 'not-a-cdcca-package' is not installed; run: pip install --no-deps"):
        package_dir("not_a_cdcca_package")


def test_corrupt_llm_cache_asks_for_a_rebuild(tmp_path, monkeypatch):
    monkeypatch.setenv("CDCCA_CACHE", str(tmp_path))
    cache = tmp_path / "smollm2-135m"
    cache.mkdir()
    (cache / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AssetError, match="cdcca assets --rebuild"):
        load_llm()
