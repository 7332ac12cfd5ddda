"""End-to-end greedy decoding speed of a Llama-7B-shaped model: bf16 vs tensorslim int4 g128, int3, int2, ternary.

Run from the repo root on a CUDA machine (no install, no download):
    python bench/decode.py                 # batches 1, 4, 16; 64 new tokens after a 16-token prompt
    python bench/decode.py --layers 8      # a shallower model (quick check; tokens/s scale ~1/layers)
    python bench/decode.py --fuse          # q/k/v and gate/up as one linear each, for bf16 and compressed alike
    python bench/decode.py --fuse --compile --batches 1   # the step through torch.compile (compile ~1 min/variant)
    python bench/decode.py --fuse --compile --batches 1 --formats int4:g128,int4:g128@prepared
                                           # "@prepared": CompressedLinear.prepare_kernels() after compressing
    python bench/decode.py --fuse --compile --batches 1 --formats int4:g128,int4:g128@head
                                           # "@head": the LM head compressed too (as torchao's int4 path does)
Each row also gives ``extra_gpu_gib``: ``torch.cuda.memory_allocated()`` after its timing, less bf16's (the bench
keeps the bf16 weights for every variant, so this is what the compressed linears and their kernel layouts add).
The shapes come from a ``transformers.LlamaConfig`` (Llama-2-7B: 32 layers, 4096 hidden, 11008 MLP, 32 heads,
32000 vocab) with random weights (std 0.02) on the GPU. The decoder is a minimal gpt-fast-style Llama (RMSNorm,
RoPE, static KV cache, SDPA) whose linears are plain ``nn.Linear`` (bf16) or ``CompressedLinear`` (every linear of
every block; embeddings and head stay bf16 unless ``@head``). One decode step is captured in a CUDA graph for every variant, so the
numbers measure GPU work, not Python. Correctness: the greedy tokens of the kernel path against the reference path
on the same compressed weights (batch 1, first 24 tokens), two references: "exact" is the product the kernels are
specified to compute (``decode()`` in fp32, fp32 accumulation, one rounding to bf16: ``reference_fp32``), and "bf16"
is ``decode()`` in the activation dtype then ``F.linear`` (the weights rounded to bf16 first, so a different model
by ~2^-9 a weight; with a random model's near-tied logits its tokens drift apart from either fp32-exact path).
Prints a markdown table and writes ``$OUT/decode_b<batches>[_compiled].json`` (or under ``runs/``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time

sys.path.insert(0, "src")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


class Block(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        h, self.nh, self.nkv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = h // self.nh
        self.q_proj = nn.Linear(h, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(h, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(h, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, h, bias=False)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)
        self.ln1 = nn.Parameter(torch.ones(h))
        self.ln2 = nn.Parameter(torch.ones(h))

    def forward(self, x, pos, cos, sin, mask, kc, vc):
        b = x.shape[0]
        a = rms(x, self.ln1)
        if hasattr(self, "qkv_proj"):  # fused (see fuse()): one GEMV for q, k, v and one for gate, up
            q, k, v = self.qkv_proj(a).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        else:
            q, k, v = self.q_proj(a), self.k_proj(a), self.v_proj(a)
        q = q.reshape(b, 1, self.nh, self.hd).transpose(1, 2)
        k = k.reshape(b, 1, self.nkv, self.hd).transpose(1, 2)
        v = v.reshape(b, 1, self.nkv, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v)
        o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=self.nkv != self.nh)
        x = x + self.o_proj(o.transpose(1, 2).reshape(b, 1, -1))
        a = rms(x, self.ln2)
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(a).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(a), self.up_proj(a)
        return x + self.down_proj(F.silu(gate) * up)


def rms(x, w, eps: float = 1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class Llama(nn.Module):
    def __init__(self, cfg, max_len: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        hd = cfg.hidden_size // cfg.num_attention_heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(max_len).float(), inv)
        ang = torch.cat((ang, ang), dim=-1)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        self.max_len = max_len

    def caches(self, b: int):
        cfg = self.cfg
        shape = (b, cfg.num_key_value_heads, self.max_len, cfg.hidden_size // cfg.num_attention_heads)
        dev, dt = self.embed.weight.device, self.embed.weight.dtype  # (the head may be compressed: @head)
        return [(torch.zeros(shape, device=dev, dtype=dt), torch.zeros(shape, device=dev, dtype=dt))
                for _ in self.blocks]

    def step(self, tok, pos, caches):
        """One token per sequence: ``tok [B, 1]``, ``pos [1]`` -> next greedy tokens ``[B, 1]``."""
        return self.logits(tok, pos, caches).argmax(-1, keepdim=True)

    def logits(self, tok, pos, caches):
        """``[B, vocab]`` fp32 logits of the next token."""
        x = self.embed(tok)
        cos = self.cos[pos].to(x.dtype)[None, None]
        sin = self.sin[pos].to(x.dtype)[None, None]
        mask = (torch.arange(self.max_len, device=tok.device) <= pos)[None, None, None, :]
        for blk, (kc, vc) in zip(self.blocks, caches):
            x = blk(x, pos, cos, sin, mask, kc, vc)
        return self.head(rms(x, self.norm)).float()[:, -1]


class RefLinear(nn.Module):
    """A reference path on the same compressed weight: ``exact`` = ``decode()`` and the product in fp32, rounded once
    to the activation dtype (what the kernels compute, up to fp32 summation order); ``f64`` the same product in
    float64 (another exact summation: the two differ only where a bf16 rounding falls on the other side); ``bf16``
    ``decode()`` in the activation dtype, then ``F.linear``."""

    def __init__(self, cw, mode: str) -> None:
        super().__init__()
        self.cw, self.mode = cw, mode

    def forward(self, x):
        from tensorslim.kernels.reference import reference_fp32, reference_linear

        if self.mode == "exact":
            return reference_fp32(self.cw, x).to(x.dtype)
        if self.mode == "f64":
            return F.linear(x.double(), self.cw.decode(torch.float64).to(x.device)).to(x.dtype)
        return reference_linear(self.cw, x)


NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fuse(dense: dict) -> dict:
    """q/k/v and gate/up weights concatenated along the outputs. Integer groups run along the inputs, so RTN of the
    concatenation gives exactly the codes and scales of the separate matrices (same model, fewer, larger GEMVs)."""
    out = {}
    for (i, name), w in dense.items():
        for fused, parts in FUSED.items():
            if name == parts[0]:
                out[(i, fused)] = torch.cat([dense[(i, p)] for p in parts])
        if not any(name in parts for parts in FUSED.values()):
            out[(i, name)] = w
    return out


def compress(model: Llama, dense: dict, spec: str, ref: str | None = None) -> None:
    """Every block linear compressed to ``spec``: ``CompressedLinear`` (the kernels), or with ``ref`` a
    :class:`RefLinear` of that mode. ``spec@prepared``: then ``prepare_kernels`` on them (stored weights to host).
    ``spec@head``: the LM head too (torchao's int4 path quantizes every linear, the head included)."""
    from tensorslim.formats import CompressedLinear, parse_format, prepare_kernels, quantize_rtn

    spec, _, mode = spec.partition("@")
    if mode == "head":
        compress(model, dense, spec, ref)
        if not hasattr(model, "dense_head"):  # (a second call, as the reference modes make, keeps the first)
            model.dense_head = model.head
        cw = quantize_rtn(model.dense_head.weight.float(), parse_format(spec))
        model.head = RefLinear(cw, ref) if ref else CompressedLinear(cw)
        return
    if mode:
        assert mode == "prepared" and not ref, mode
        compress(model, dense, spec)
        done, total = prepare_kernels(model)
        print(f"prepare_kernels: {done} of {total} linears", flush=True)
        return
    fmt = parse_format(spec)
    for i, blk in enumerate(model.blocks):
        for name in sorted({n for (j, n) in dense if j == i}):
            w = dense[(i, name)]
            if spec.startswith("ternary"):
                from tensorslim.formats.ternary import quantize_ternary

                cw = quantize_ternary(w.float(), fmt)
            else:
                cw = quantize_rtn(w.float(), fmt)
            setattr(blk, name, RefLinear(cw, ref) if ref else CompressedLinear(cw))


def restore(model: Llama, dense: dict) -> None:
    if hasattr(model, "dense_head"):  # after spec@head
        model.head = model.dense_head
        del model.dense_head
    for i, blk in enumerate(model.blocks):
        for name in NAMES + tuple(FUSED):
            if hasattr(blk, name):
                delattr(blk, name)
        for name in sorted({n for (j, n) in dense if j == i}):
            lin = nn.Linear(1, 1, bias=False)
            lin.weight = nn.Parameter(dense[(i, name)], requires_grad=False)
            setattr(blk, name, lin)


@torch.no_grad()
def generate_eager(model: Llama, prompt: torch.Tensor, n_new: int, forced: torch.Tensor | None = None,
                   with_logits: bool = False):
    """Greedy tokens ``[B, n_new]``; with ``forced`` the inputs after the prompt are those tokens (teacher forcing);
    ``with_logits``: also the ``[B, n_new, vocab]`` fp32 logits each token was chosen from."""
    caches = model.caches(prompt.shape[0])
    toks, logits = [], []
    nxt = None
    lp = prompt.shape[1]
    for p in range(lp + n_new - 1):
        tok = prompt[:, p:p + 1] if p < lp else (forced[:, p - lp:p - lp + 1] if forced is not None else nxt)
        lg = model.logits(tok, torch.tensor([p], device=prompt.device), caches)
        nxt = lg.argmax(-1, keepdim=True)
        if p >= prompt.shape[1] - 1:
            toks.append(nxt)
            logits.append(lg)
    return (torch.cat(toks, dim=1), torch.stack(logits, dim=1)) if with_logits else torch.cat(toks, dim=1)


@torch.no_grad()
def generate_graph(model: Llama, prompt: torch.Tensor, n_new: int, compile_step: bool = False,
                   profile: str | None = None) -> tuple[torch.Tensor, float]:
    """Greedy decoding with the step in a CUDA graph; returns tokens and seconds for the ``n_new`` decode steps.
    ``compile_step``: the step goes through ``torch.compile`` first (Inductor fuses the norms, RoPE, residual adds;
    our kernels enter the graph as ``torch.library`` custom ops), after one eager step has tuned every kernel.
    ``profile``: a path; after the timed steps, the GPU kernels of 5 more steps (graph replays) are traced with
    ``torch.profiler`` and their totals per kernel name written there (which kernels a step's time goes to)."""
    step = model.step
    if compile_step:
        with torch.no_grad():
            model.step(torch.zeros(prompt.shape[0], 1, dtype=torch.long, device=prompt.device),
                       torch.zeros(1, dtype=torch.long, device=prompt.device), model.caches(prompt.shape[0]))
        torch._dynamo.reset()
        step = torch.compile(model.step, dynamic=False)
    b = prompt.shape[0]
    caches = model.caches(b)
    tok = torch.zeros(b, 1, dtype=torch.long, device=prompt.device)
    pos = torch.zeros(1, dtype=torch.long, device=prompt.device)
    g = torch.cuda.CUDAGraph()
    capture = torch.cuda.graph(g)
    s = capture.capture_stream  # warm up on the stream that will capture (split-K scratch is made per stream)
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up: compiles and tunes every kernel outside the capture
        for _ in range(2):
            step(tok, pos, caches)
    torch.cuda.current_stream().wait_stream(s)
    with capture:
        out = step(tok, pos, caches)
    for c in caches:
        c[0].zero_(), c[1].zero_()
    for p in range(prompt.shape[1]):  # prefill token by token through the same graph
        tok.copy_(prompt[:, p:p + 1])
        pos.fill_(p)
        g.replay()
    from tensorslim.kernels.dispatch import warm_clocks

    warm_clocks(g.replay, 0.3)  # the last prefill step again (same token, same cache slot): GPU clocks up first
    toks = [out.clone()]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for p in range(prompt.shape[1], prompt.shape[1] + n_new - 1):
        tok.copy_(out)
        pos.fill_(p)
        g.replay()
        toks.append(out.clone())
    torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    if profile:
        try:  # a diagnostic: its failure must not cost the timed run
            write_profile(g.replay, profile)
        except Exception as e:
            print(f"profile not written: {type(e).__name__}: {e}", flush=True)
    return torch.cat(toks, dim=1), sec


def write_profile(replay, path: str, steps: int = 5) -> None:
    """GPU time per kernel name over ``steps`` calls of ``replay``, as a table (microseconds per step), atomically."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            replay()
        torch.cuda.synchronize()
    rows = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            r = rows.setdefault(ev.name, [0.0, 0])
            r[0] += ev.time_range.elapsed_us() / steps
            r[1] += 1
    total = sum(v[0] for v in rows.values()) or float("nan")  # nan: the profiler saw no kernel
    lines = [f"GPU kernel time per step: {total:.1f} us over {sum(v[1] for v in rows.values()) // steps} kernels",
             "us/step  share  calls/step  kernel"]
    for name, (us, n) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"{us:8.1f}  {100 * us / total:4.1f}%  {n // steps:5d}  {name[:150]}")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)


def build(layers: int, max_len: int, fused: bool, device: str) -> tuple[Llama, dict]:
    """The Llama-2-7B-shaped model (``layers`` blocks) in bf16 with random N(0, 0.02) matrices (seed 0), and its
    block linears' weights by ``(block, name)`` (q/k/v and gate/up concatenated when ``fused``)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(cfg, max_len=max_len).to(torch.bfloat16)
    for p in model.parameters():
        if p.ndim == 2:
            p.data.normal_(0, 0.02)
    model.eval()
    dense = {(i, n): getattr(b, n).weight.data for i, b in enumerate(model.blocks) for n in NAMES}
    if fused:
        dense = fuse(dense)
        restore(model, dense)
    return model, dense


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--formats", default="int4:g128,int3:g128,int2:g128,ternary:g128")
    ap.add_argument("--fuse", action="store_true", help="q/k/v and gate/up as one linear each (bf16 and compressed)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (bf16 and compressed)")
    ap.add_argument("--profile", action="store_true", help="also write each variant's GPU time per kernel name "
                    "(torch.profiler over 5 graph replays) to decode_profile_<format>_b<batch>.txt")
    ap.add_argument("--jobs", type=int, default=12, help="processes pre-compiling every kernel candidate the tuner "
                    "will time (Triton's disk cache), before the timed process tunes them (0: none)")
    args = ap.parse_args()
    prompt_len = 16
    t_start = time.time()
    model, dense = build(args.layers, prompt_len + max(args.new, 24) + 1, args.fuse, "cuda")  # 24: the token check
    cfg = model.cfg
    batches = [int(b) for b in args.batches.split(",")]
    if args.jobs:  # a fresh machine otherwise compiles ~50 candidates per (shape, format, batch) one by one
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from kernels import prewarm

        shapes = sorted({(w.shape[1], w.shape[0]) for w in dense.values()}
                        | ({(cfg.hidden_size, cfg.vocab_size)} if "@head" in args.formats else set()))
        specs = dict.fromkeys(f.partition("@")[0] for f in args.formats.split(","))
        prewarm([(k, n, spec, batches) for k, n in shapes for spec in specs], args.jobs)
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}; {args.layers} layers; built in {time.time() - t_start:.0f}s")
    prompts = {b: torch.randint(0, cfg.vocab_size, (b, prompt_len), device="cuda") for b in batches}
    rows = []
    for spec in ["bf16"] + args.formats.split(","):
        check: dict = {}
        if spec != "bf16":
            p1 = prompts[batches[0]][:1]
            refs = {}
            for mode in ("exact", "bf16"):
                compress(model, dense, spec.replace("@prepared", ""), ref=mode)
                refs[mode] = generate_eager(model, p1, 24)
            compress(model, dense, spec)
            got = generate_eager(model, p1, 24)
            for mode, ref_toks in refs.items():
                forced = generate_eager(model, p1, 24, forced=ref_toks)
                # free-running: equal before the first difference; teacher-forced: the same next token at each of
                # the 24 positions given the reference's tokens
                check[f"greedy_equal_prefix_of_24_{mode}"] = int((ref_toks == got).long().cumprod(1).sum())
                check[f"teacher_forced_top1_of_24_{mode}"] = int((ref_toks == forced).sum())
        for b in batches:
            t_c = time.time()
            prof = (os.path.join(os.environ.get("OUT") or "runs", f"decode_profile_{spec.replace(':', '_')}_b{b}.txt")
                    if args.profile else None)
            if prof:
                os.makedirs(os.path.dirname(prof), exist_ok=True)
            toks, sec = generate_graph(model, prompts[b], args.new, compile_step=args.compile, profile=prof)
            print(f"{spec} batch {b}: {time.time() - t_c:.0f}s incl. compile/tune", flush=True)
            tps = b * (args.new - 1) / sec
            torch.cuda.synchronize()
            gc.collect()
            row = {"format": spec, "batch": b, "tokens_per_s": tps, "ms_per_step": 1e3 * sec / (args.new - 1),
                   "gpu_allocated_gib": torch.cuda.memory_allocated() / 2**30, **check}
            rows.append(row)
            print(json.dumps(row))
        restore(model, dense)
        torch.cuda.empty_cache()
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["format"] == "bf16"}
    mem0 = {r["batch"]: r["gpu_allocated_gib"] for r in rows if r["format"] == "bf16"}
    for r in rows:
        r["extra_gpu_gib"] = r["gpu_allocated_gib"] - mem0[r["batch"]]
    fused = (", q/k/v and gate/up fused" if args.fuse else "") + (", torch.compile" if args.compile else "")
    print(f"\n{dev}, Llama-2-7B shapes ({args.layers} layers{fused}), random weights, greedy, CUDA graph per step\n")
    print("| format | batch | tokens/s | ms/step | vs bf16 | GPU GiB beyond bf16 | greedy prefix equal (of 24): exact / "
          "bf16 reference | teacher-forced top-1 equal (of 24): exact / bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        m1 = " / ".join(str(r.get(f"greedy_equal_prefix_of_24_{m}", "")) for m in ("exact", "bf16"))
        m2 = " / ".join(str(r.get(f"teacher_forced_top1_of_24_{m}", "")) for m in ("exact", "bf16"))
        print(f"| {r['format']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.2f} | "
              f"{r['tokens_per_s'] / base[r['batch']]:.2f}x | {r['extra_gpu_gib']:.2f} | "
              f"{m1 if r['format'] != 'bf16' else ''} | "
              f"{m2 if r['format'] != 'bf16' else ''} |")
    print(f"\ntotal {time.time() - t_start:.0f}s")
    out_dir = os.environ.get("OUT") or "runs"
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"decode_b{args.batches.replace(',', '-')}{'_compiled' if args.compile else ''}.json")
    with open(path + ".tmp", "w") as f:  # one file per run kind, written whole or not at all
        json.dump({"device": dev, "layers": args.layers, "fused": args.fuse, "compiled": args.compile, "rows": rows},
                  f, indent=1)
    os.replace(path + ".tmp", path)
    assert math.isfinite(sum(r["tokens_per_s"] for r in rows))


if __name__ == "__main__":
    main()
