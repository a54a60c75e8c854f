"""The kernel cache: Triton's and inductor's directories under one root, warm or cold said once."""

import logging

from align.kernels import cache


def _fresh(monkeypatch, tmp_path):
    monkeypatch.setattr(cache, "_DONE", None)
    monkeypatch.setenv("ALIGN_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)


def test_cold_then_warm_with_one_line(monkeypatch, tmp_path, caplog):
    import os

    _fresh(monkeypatch, tmp_path)
    with caplog.at_level(logging.INFO, logger="align.kernels.cache"):
        line = cache.use_kernel_cache()
        assert cache.use_kernel_cache() == line  # said once per process
    assert "cold" in line and str(tmp_path) in line and caplog.text.count("kernel cache") == 1
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "triton")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    for name in ("a", "b"):  # what Triton leaves: one directory per kernel holding its binary
        (tmp_path / "triton" / name).mkdir(parents=True)
        (tmp_path / "triton" / name / "k.cubin").write_bytes(b"\0")
    _fresh(monkeypatch, tmp_path)
    assert "warm, 2 compiled kernels" in cache.use_kernel_cache()


def test_a_users_own_triton_dir_is_kept(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path / "align")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    cache.use_kernel_cache()
    import os

    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine")


def test_inductors_own_default_is_not_taken_for_a_users_choice(monkeypatch, tmp_path):
    """``import torch._dynamo`` writes /tmp/torchinductor_<user> into the environment before align runs."""
    import os

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    _fresh(monkeypatch, tmp_path)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.path.abspath(default_cache_dir()))
    cache.use_kernel_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
