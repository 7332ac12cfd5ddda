"""The GPU bench scripts' CPU-side logic (model surgery, weight builders, task lists), so a slip there fails here
and not in a device call (session 14 lost two calls to such slips: ``bench/decode.py``'s ``@head`` with the
reference modes, and ``bench/wa_ext_variants.make`` on 576 inputs)."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")


@pytest.fixture(scope="module")
def bench_mod():
    sys.path.insert(0, os.path.abspath(BENCH))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(os.path.abspath(BENCH))


def test_decode_compress_and_restore_cycles(bench_mod, caplog):
    """Every variant ``bench/decode.py`` runs, on a 2-block Llama (hidden 64) on the CPU: the reference modes one
    after another (as its token check does), then the kernels' modules, then back to dense; each compressed model
    gives finite logits, the reference modes agree with the modules to bf16 rounding, and the dense model comes
    back exactly."""
    from transformers import LlamaConfig

    decode = bench_mod("decode")
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=96)
    torch.manual_seed(0)
    model = decode.Llama(cfg, max_len=12).to(torch.bfloat16)
    for p in model.parameters():
        if p.ndim == 2:
            p.data.normal_(0, 0.02)
    dense = decode.fuse({(i, n): getattr(b, n).weight.data for i, b in enumerate(model.blocks) for n in decode.NAMES})
    decode.restore(model, dense)
    prompt = torch.randint(0, 96, (1, 4))
    base = decode.generate_eager(model, prompt, 3, with_logits=True)[1]
    for spec in ("int4:g32", "int4:g32@head", "int4:g32@prepared"):
        outs = {}
        for mode in ("exact", "bf16"):
            decode.compress(model, dense, spec.replace("@prepared", ""), ref=mode)
            outs[mode] = decode.generate_eager(model, prompt, 3, with_logits=True)[1]
        decode.compress(model, dense, spec)
        outs["kernel"] = decode.generate_eager(model, prompt, 3, with_logits=True)[1]
        assert ("@head" in spec) == hasattr(model, "dense_head")
        for mode, lg in outs.items():
            assert torch.isfinite(lg).all(), (spec, mode)
            assert (lg - outs["exact"]).abs().max() <= 0.05 * outs["exact"].abs().max(), (spec, mode)
        decode.restore(model, dense)
        assert not hasattr(model, "dense_head") and isinstance(model.head, torch.nn.Linear)
        assert torch.equal(decode.generate_eager(model, prompt, 3, with_logits=True)[1], base), spec


def test_new_format_benches_build_every_weight_and_task(bench_mod):
    """``bench/prepared_ext.py`` and ``bench/wa_ext_variants.py``: every (format, shape) they build, their
    pre-compile task list, and which shapes have a "wa" repack (576 inputs: none, so ``prepare_kernels`` declines)."""
    from tensorslim.kernels import dispatch_ext

    prepared = bench_mod("prepared_ext")
    variants = bench_mod("wa_ext_variants")
    for spec in prepared.SPECS:
        for k, n in prepared.CHECK_SHAPES + prepared.SPEED_SHAPES:
            k_, n_ = (1024, n // 16) if k >= 4096 else (k, n)  # the same block fit, small enough for a CPU
            cw = variants.make(spec, k_, n_, "cpu")
            assert cw.shape == (n_, k_)
            assert (dispatch_ext.wa_ext_reason(cw) is None) == (k != 576), (spec, k)
    tasks = prepared.warm_tasks(prepared.SPEED_ROWS)
    assert len(set(tasks)) == len(tasks) and {t[0] for t in tasks} == set(prepared.SPECS)


def test_greedy_real_flow_on_a_tiny_model(bench_mod, tiny_llm_dir):
    """``bench/greedy_real.py`` end to end on the CPU (2-block Llama with SmolLM2's tokenizer): compress, the kernel
    modules and the exact reference swapped in and back, fp32 head, one row per prompt."""
    greedy_real = bench_mod("greedy_real")
    res = greedy_real.run(str(tiny_llm_dir), "int4:g32", 3, "cpu")
    assert len(res["rows"]) == len(greedy_real.PROMPTS) and 4 < res["bits_per_weight"] < 5
    for row in res["rows"]:
        assert 0 <= row["equal_prefix"] <= 3 and 0 <= row["teacher_forced_top1"] <= 3 and row["min_ref_margin"] >= 0
        assert 0 <= row["ref64_equal_prefix"] <= 3 and 0 <= row["ref_teacher_forced_top1"] <= 3
        # on the CPU a CompressedLinear runs the bf16-weight path, so its gap is that path's, to the bit
        assert row["kernels_max_logit_gap"] == row["bf16_max_logit_gap"] > row["ref64_max_logit_gap"] >= 0
