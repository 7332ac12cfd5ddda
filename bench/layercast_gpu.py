"""LayerCast vs plain bf16: are a sequence's logits the same when it runs alone and inside a batch of 8? (GPU)

Batch-size-dependent GEMM kernels (split-K, tile choice) make bf16 results change with the batch; LayerCast keeps
bf16 storage but computes in fp32. Model: SmolLM2-135M's architecture (576 hidden, 30 layers) with random weights
(no download), built on the GPU; 8 random sequences of 256 tokens.

    python bench/layercast_gpu.py            # needs CUDA; prints a table, writes $OUT/layercast_gpu.json if set
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tensorslim.runtime.numerics import apply_numerics  # noqa: E402


def compare(label: str, cfg, dev: torch.device) -> list[dict]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (8, 256), device=dev)
    rows = []
    for mode in ("bf16", "layercast"):
        m = apply_numerics(copy.deepcopy(base), mode).to(dev)
        with torch.inference_mode():
            # prefill: sequence 0 alone vs inside the batch of 8 (M = 256 vs 2048 rows per GEMM)
            alone = m(ids[:1], use_cache=False).logits.float()
            batched = m(ids, use_cache=False).logits[:1].float()
            # decode: one new token per sequence on top of a KV cache (M = 1 vs 8 rows: GEMV vs GEMM kernels)
            step = ids[:, -1:]
            out1 = m(ids[:1, :-1], use_cache=True)
            d_alone = m(step[:1], past_key_values=out1.past_key_values, use_cache=True).logits.float()
            out8 = m(ids[:, :-1], use_cache=True)
            d_batch = m(step, past_key_values=out8.past_key_values, use_cache=True).logits[:1].float()
        for phase, a, b in (("prefill 256 tokens", alone, batched), ("decode step", d_alone, d_batch)):
            diff = float((a - b).abs().max())
            rows.append({"model": label, "mode": mode, "phase": phase, "max_abs_diff": diff, "identical": diff == 0.0,
                         "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean())})
    return rows


def main() -> None:
    from transformers import LlamaConfig

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = {
        "smollm2-135m shape (576 hidden, 30 layers)": dict(
            hidden_size=576, intermediate_size=1536, num_hidden_layers=int(os.environ.get("LAYERS", 30)),
            num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
        "llama-7b shape, 2 layers (4096 hidden)": dict(
            hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=32000),
    }
    rows = []
    for label, kw in shapes.items():
        rows += compare(label, LlamaConfig(max_position_embeddings=2048, **kw), dev)
    print(f"device: {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'} torch {torch.__version__}")
    print("| model | mode | phase | max abs logit diff, batch 1 vs 8 | identical | argmax agreement |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['mode']} | {r['phase']} | {r['max_abs_diff']:.3g} | {'yes' if r['identical'] else 'no'} | "
              f"{r['argmax_agree']:.4f} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "layercast_gpu.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
