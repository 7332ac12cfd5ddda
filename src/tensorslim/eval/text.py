"""Evaluation text: read a file and turn it into one 1-D token tensor.

The protocol (docs/evaluation.md) reads the file as UTF-8, normalizes CRLF line ends to LF and tokenizes the whole
text once with the tokenizer's defaults (exactly ``tokenizer(text)["input_ids"]``, so a tokenizer that adds a BOS
token adds exactly one, at the very start). Windows are cut from that single token stream later, by
:func:`tensorslim.eval.lm.evaluate_lm`, never by re-tokenizing pieces of text.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CalibrationError, ConfigError

__all__ = ["read_text", "tokenize_text"]

logger = logging.getLogger(__name__)

_BOM = "\ufeff"


def read_text(path: str | os.PathLike[str]) -> str:
    """Read a UTF-8 text file, with CRLF line ends normalized to LF and a leading BOM removed.

    Raises ConfigError when the path is missing, not a file, or not UTF-8 text (NUL bytes or invalid UTF-8), and
    CalibrationError when the file holds no text (empty or only whitespace).
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"text file {str(p)!r} does not exist; pass the path of a UTF-8 text file")
    if not p.is_file():
        raise ConfigError(f"text path {str(p)!r} is not a regular file; pass the path of a UTF-8 text file")
    data = p.read_bytes()
    if b"\x00" in data:
        raise ConfigError(f"text file {str(p)!r} contains NUL bytes: it looks binary, not UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"text file {str(p)!r} is not valid UTF-8 (byte {exc.start}: {exc.reason}); re-encode it as UTF-8"
        ) from exc
    if text.startswith(_BOM):
        text = text[len(_BOM) :]
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise CalibrationError(f"text file {str(p)!r} is empty (no non-whitespace characters)")
    logger.debug("read %d characters from %s", len(text), p)
    return text


def tokenize_text(tokenizer: Any, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize ``text`` once, as a whole, with the tokenizer's defaults; keep the first ``max_tokens`` tokens.

    Returns a 1-D ``torch.long`` tensor. CRLF line ends are normalized to LF first (a no-op on text from
    :func:`read_text`). Raises ConfigError for a bad ``max_tokens`` or a non-string text, and CalibrationError when
    fewer than 2 tokens result (nothing could be scored).
    """
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2):
        raise ConfigError(f"max_tokens={max_tokens!r} is invalid; use an integer >= 2 or None for all tokens")
    if not isinstance(text, str):
        raise ConfigError(f"text must be a str, got {type(text).__name__}")
    text = text.replace("\r\n", "\n")
    ids = tokenizer(text)["input_ids"]
    tokens = torch.as_tensor(ids, dtype=torch.long).flatten()
    total = tokens.numel()
    if max_tokens is not None:
        tokens = tokens[:max_tokens].clone()
    if tokens.numel() < 2:
        raise CalibrationError(
            f"the text gives {tokens.numel()} token(s); at least 2 are needed to score one next-token prediction"
        )
    logger.debug("tokenized %d characters into %d tokens, kept %d", len(text), total, tokens.numel())
    return tokens
