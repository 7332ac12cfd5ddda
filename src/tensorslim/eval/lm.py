"""Language-model quality: perplexity, KL divergence and top-1 agreement against a base model; layer error.

Protocol (written down in full in docs/evaluation.md):

* The token stream is cut into non-overlapping windows of ``window`` tokens; each window is scored on its own
  (token t is predicted from the tokens before it inside its window only). Every token after the first of a window
  is scored: ``window - 1`` per full window. A last, shorter window is scored too when it has at least 2 tokens
  (``len - 1`` scored tokens); a last window of 1 token has nothing to score.
* Logits are cast to float32, ``log_softmax`` runs in float32 in row chunks (the full ``[T, vocab]`` log-probability
  matrix is never held), and the NLL sum is accumulated in float64. ``perplexity = exp(nll_sum / tokens)``.
* With a baseline, on the same scored positions (like llama.cpp's ``--kl-divergence`` mode):
  ``KL_t = sum_v p_base(v) * (log p_base(v) - log p_model(v))`` per token in float32 (not clamped: tiny negative
  values from rounding are kept so the mean stays unbiased); ``kl_mean`` is their float64 mean and ``kl_p99`` the
  99th percentile with linear interpolation (numpy's default ``method="linear"``, the same as ``torch.quantile``);
  ``top1_agreement`` is the fraction of scored positions where ``argmax`` of the two logit rows is equal (ties go to
  the lowest index, as ``torch.argmax`` does).

``layer_relative_error`` is the per-layer error on calibration inputs:
``sqrt(tr((W - W_hat) G (W - W_hat)^T) / tr(W G W^T))`` with ``G = X^T X``, i.e. ``||X (W - W_hat)^T||_F /
||X W^T||_F``, computed in float64; without a Gram matrix it is the Frobenius relative error.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CalibrationError, ConfigError, NumericalError

__all__ = ["LMEval", "evaluate_lm", "layer_relative_error"]

logger = logging.getLogger(__name__)

# Rows of log-probabilities computed at once: 256 x 49,152 float32 is ~50 MB per tensor.
_ROW_CHUNK = 256


@dataclass(frozen=True, kw_only=True)
class LMEval:
    """Result of :func:`evaluate_lm`. The KL fields and ``top1_agreement`` are None without a baseline."""

    perplexity: float
    nll_mean: float
    tokens_evaluated: int
    windows: int
    seconds: float
    kl_mean: float | None = None
    kl_p99: float | None = None
    top1_agreement: float | None = None


def _check_tokens(tokens: torch.Tensor) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise ConfigError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 1:
        raise ConfigError(f"tokens must be 1-D (one token stream), got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ConfigError(f"tokens must be an integer tensor of token ids, got dtype {tokens.dtype}")
    if tokens.numel() < 2:
        raise CalibrationError(f"{tokens.numel()} token(s) given; at least 2 are needed to score one prediction")
    return tokens.long()


def _windows(n: int, window: int) -> list[tuple[int, int]]:
    """(start, end) of every window with at least 2 tokens."""
    return [(s, min(s + window, n)) for s in range(0, n, window) if min(s + window, n) - s >= 2]


def _batches(spans: list[tuple[int, int]], window: int, batch_size: int) -> Iterator[list[int]]:
    """Indices into ``spans``: full windows grouped by ``batch_size``; a partial last window runs alone."""
    full = [i for i, (s, e) in enumerate(spans) if e - s == window]
    for i in range(0, len(full), batch_size):
        yield full[i : i + batch_size]
    for i, (s, e) in enumerate(spans):
        if e - s != window:
            yield [i]


@contextlib.contextmanager
def _eval_mode(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Put modules in eval mode (no dropout) for the duration, then restore each one's previous mode."""
    previous = [(m, m.training) for m in modules if m is not None]
    try:
        for m, _ in previous:
            m.eval()
        yield
    finally:
        for m, was_training in previous:
            m.train(was_training)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if logits.shape[:2] != ids.shape:
        raise ConfigError(f"model returned logits of shape {tuple(logits.shape)} for input ids {tuple(ids.shape)}")
    return logits


def _check_finite(rows: torch.Tensor, who: str, window: int, span: tuple[int, int]) -> None:
    if not torch.isfinite(rows).all():
        raise NumericalError(
            f"{who} produced non-finite logits in window {window} (tokens {span[0]}..{span[1] - 1}); "
            "check the compressed weights for inf/nan or evaluate in float32"
        )


def evaluate_lm(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    *,
    baseline: torch.nn.Module | None = None,
    window: int = 2048,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> LMEval:
    """Score ``tokens`` with ``model`` (and compare with ``baseline``) on non-overlapping windows.

    Both models must already live on ``device`` (only the token ids are moved) and return ``.logits`` when called
    as ``model(input_ids=..., use_cache=False)``. They run under ``torch.inference_mode()`` in eval mode (restored
    afterwards). ``batch_size`` groups full windows into one forward; the result equals batch size 1 up to
    floating-point tolerance. ``progress(done, total)`` is called with window counts after each forward batch.
    """
    tokens = _check_tokens(tokens)
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ConfigError(f"window={window!r} is invalid; use an integer >= 2 (the standard protocol uses 2048)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} is invalid; use an integer >= 1")
    device = torch.device(device)
    spans = _windows(tokens.numel(), window)
    start = time.perf_counter()
    nll_sum = 0.0
    count = 0
    agree = 0
    kls: list[torch.Tensor] = []
    done = 0
    with _eval_mode(model, baseline), torch.inference_mode():
        for batch in _batches(spans, window, batch_size):
            ids = torch.stack([tokens[spans[i][0] : spans[i][1]] for i in batch]).to(device)
            logits = _logits(model, ids)
            base_logits = _logits(baseline, ids) if baseline is not None else None
            for b, wi in enumerate(batch):
                n_rows = ids.shape[1] - 1
                for r0 in range(0, n_rows, _ROW_CHUNK):
                    r1 = min(r0 + _ROW_CHUNK, n_rows)
                    rows = logits[b, r0:r1].float()
                    _check_finite(rows, "model", wi, spans[wi])
                    logp = torch.log_softmax(rows, dim=-1)
                    target = ids[b, r0 + 1 : r1 + 1].unsqueeze(-1)
                    nll_sum -= logp.gather(-1, target).double().sum().item()
                    if base_logits is not None:
                        base_rows = base_logits[b, r0:r1].float()
                        _check_finite(base_rows, "baseline", wi, spans[wi])
                        base_logp = torch.log_softmax(base_rows, dim=-1)
                        kl = (base_logp.exp() * (base_logp - logp)).sum(dim=-1)
                        kls.append(kl.float().cpu())
                        agree += int((rows.argmax(dim=-1) == base_rows.argmax(dim=-1)).sum().item())
                count += n_rows
            del logits, base_logits
            done += len(batch)
            logger.debug("scored window(s) %s, %d/%d", batch, done, len(spans))
            if progress is not None:
                progress(done, len(spans))
    nll_mean = nll_sum / count
    if not math.isfinite(nll_mean):
        raise NumericalError(f"mean NLL is {nll_mean} over {count} tokens")
    perplexity = math.exp(nll_mean) if nll_mean < 709.0 else math.inf
    kl_mean = kl_p99 = top1 = None
    if baseline is not None:
        kl_all = torch.cat(kls).double().numpy()
        kl_mean = float(kl_all.mean())
        kl_p99 = float(np.percentile(kl_all, 99.0, method="linear"))
        top1 = agree / count
    seconds = time.perf_counter() - start
    logger.info(
        "evaluated %d tokens in %d windows of %d: ppl %.4f%s (%.1f s)",
        count,
        len(spans),
        window,
        perplexity,
        "" if kl_mean is None else f", KL mean {kl_mean:.5f}, p99 {kl_p99:.5f}, top-1 {top1:.4f}",
        seconds,
    )
    return LMEval(
        perplexity=perplexity,
        nll_mean=nll_mean,
        tokens_evaluated=count,
        windows=len(spans),
        seconds=seconds,
        kl_mean=kl_mean,
        kl_p99=kl_p99,
        top1_agreement=top1,
    )


def layer_relative_error(W: torch.Tensor, W_hat: torch.Tensor, gram: torch.Tensor | None = None) -> float:
    """Relative error of ``W_hat`` against ``W`` (both ``[out, in]``), weighted by the inputs when ``gram`` is given.

    With ``gram = X^T X`` (``[in, in]``): ``sqrt(tr(D G D^T) / tr(W G W^T))``, ``D = W - W_hat``, which equals
    ``||X D^T||_F / ||X W^T||_F``; without it: ``||D||_F / ||W||_F``. Computed in float64 on ``W``'s device.
    Returns 0.0 when both numerator and denominator are 0, ``inf`` when only the denominator is.
    """
    if W.shape != W_hat.shape or W.dim() != 2:
        raise ConfigError(
            f"W and W_hat must be 2-D matrices of the same shape, got {tuple(W.shape)} and {tuple(W_hat.shape)}"
        )
    w = W.detach().to(torch.float64)
    d = w - W_hat.detach().to(device=w.device, dtype=torch.float64)
    if gram is None:
        num = float((d * d).sum())
        den = float((w * w).sum())
    else:
        if gram.shape != (W.shape[1], W.shape[1]):
            raise ConfigError(
                f"gram must be [in, in] = [{W.shape[1]}, {W.shape[1]}] for W of shape {tuple(W.shape)}, "
                f"got {tuple(gram.shape)}"
            )
        g = gram.detach().to(device=w.device, dtype=torch.float64)
        num = float(((d @ g) * d).sum())
        den = float(((w @ g) * w).sum())
    if not (math.isfinite(num) and math.isfinite(den)):
        raise NumericalError(f"non-finite values in layer error (numerator {num}, denominator {den})")
    # G is positive semi-definite, so both traces are >= 0; tiny negatives are float64 rounding.
    num, den = max(num, 0.0), max(den, 0.0)
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)
