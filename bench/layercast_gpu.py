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


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = torch.device("cuda")
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 49152, (8, 256), device=dev)
    rows = []
    for mode in ("bf16", "layercast"):
        m = apply_numerics(copy.deepcopy(base), mode).to(dev)
        with torch.inference_mode():
            alone = m(ids[:1], use_cache=False).logits.float()
            batched = m(ids, use_cache=False).logits[:1].float()
        diff = float((alone - batched).abs().max())
        rows.append({"mode": mode, "max_abs_diff": diff, "identical": diff == 0.0,
                     "argmax_agree": float((alone.argmax(-1) == batched.argmax(-1)).float().mean())})
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}")
    print("| mode | max abs logit diff, batch 1 vs 8 | identical | argmax agreement |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['max_abs_diff']:.3g} | {'yes' if r['identical'] else 'no'} | {r['argmax_agree']:.4f} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "layercast_gpu.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
