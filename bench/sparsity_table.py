"""Pruning quality table on SmolLM2-135M: magnitude vs Wanda vs SparseGPT (50%, 2:4), joint 4-bit, GQSA group sparsity.

Same protocol and machinery as ``quant_table.py`` (one base model, its logits cached for every row's KL / top-1,
each row compresses a fresh copy through the block-by-block runner on calibration text, then the standard
evaluation). Prints a markdown table (after every row) and writes JSON under runs/.

    python bench/sparsity_table.py --suite unstructured,nm --threads 1 --reference-cache runs/ref_smollm2_wiki32k
"""

from __future__ import annotations

from quant_args import parse_quant_args  # noqa: E402  (bench/ is on sys.path when run as a script)
from quant_table import report, run_row, setup

SUITES: dict[str, list[tuple[str, str]]] = {
    "unstructured": [("magnitude", "sparse:0.5"), ("wanda", "sparse:0.5"), ("sparsegpt", "sparse:0.5")],
    "nm": [("magnitude", "sparse:2:4"), ("wanda", "sparse:2:4"), ("sparsegpt", "sparse:2:4")],
    "joint": [("wanda", "sparse:2:4+int4:g64"), ("sparsegpt", "sparse:2:4+int4:g64")],
    "gqsa": [("sparsegpt", "groupsparse:0.5+int4:g64")],
    "gqsa-more": [("sparsegpt", "groupsparse:0.25+int4:g64"), ("wanda", "groupsparse:0.5+int4:g64")],
    # equal bits per weight: GQSA 50% + int4 (2.31) vs 2:4 + int2 (2.29); 2:4 + int4 (3.32) vs GQSA 28% + int4 (3.30)
    "gqsa-bpw": [("sparsegpt", "sparse:2:4+int2:g64"), ("sparsegpt", "groupsparse:0.28+int4:g64")],
}
SUITES["all"] = SUITES["unstructured"] + SUITES["nm"] + SUITES["joint"] + SUITES["gqsa"]


def main() -> None:
    args, opts = parse_quant_args(
        "runs/sparsity_table.json",
        extra=lambda ap: ap.add_argument("--suite", default="all", help=f"one of {sorted(SUITES)} or comma-separated"))
    ts, base, tok, tokens, data, reference = setup(args)
    rows = []
    for name, spec in [c for s in args.suite.split(",") for c in SUITES[s]]:
        rows.append(run_row(ts, args, base, tok, tokens, data, reference, spec, name, opts, "none"))
        report(args, rows)


if __name__ == "__main__":
    main()
