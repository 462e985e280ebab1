"""Session fixtures of the system tests: one persistent compilation cache, one tiny random model
directory and one warm-started arithmetic model, each built once and shared by the workers."""

from __future__ import annotations

import os

import filelock
import helpers
import pytest


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory):
    """A directory every pytest-xdist worker of this session sees (the session's base temp)."""
    base = tmp_path_factory.getbasetemp()
    return str(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)


@pytest.fixture(scope="session")
def compile_cache(shared_dir):
    """The persistent XLA compilation cache (JAX_COMPILATION_CACHE_DIR, else one for this
    session), switched on in this process too: every `train()` builds new jitted functions,
    and the cache turns their recompilation into a load. Child runs get it through
    `helpers.subprocess_env`."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        shared_dir, "jax-compilation-cache")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    cc.reset_cache()  # re-reads the settings at the next compilation
    return path


def _once(shared_dir: str, name: str, build) -> str:
    path = os.path.join(shared_dir, name)
    with filelock.FileLock(path + ".lock"):
        if not os.path.isdir(path):
            build(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(shared_dir, compile_cache):
    """A Hugging Face directory: arithmetic tokenizer + random tiny qwen2 (stands in for Qwen
    and SmolLM2 weights)."""
    return _once(shared_dir, "tiny-model", helpers.build_tiny_model)


@pytest.fixture(scope="session")
def sft_model(shared_dir, compile_cache):
    """The warm-started tiny arithmetic model directory (tokenizer included)."""

    def build(path):
        work = path + ".work"
        out = helpers.build_sft_model(work)
        os.replace(out, path)

    return _once(shared_dir, "sft-model", build)
