"""Inference speed of the engine: prefill tokens/s, decode tokens/s at batch 1 and with 16 samples.

    python benchmarks/decode.py                          # CPU preset shape (d6, head dim 64, vocab 8192), random weights
    python benchmarks/decode.py --source base            # a trained checkpoint
    python benchmarks/decode.py --compile                # torch.compile the decode step
    python benchmarks/decode.py --device cuda --depth 20 --head-dim 128 --vocab-size 65536 --max-seq-len 2048 \
        --compile                                        # the d20 preset's shape on a GPU (CUDA graphs by default)

Prints ONE JSON line. It also measures the memory bandwidth in the same run (a large tensor copy, before and after
the batch-1 runs, the higher reading kept) and the batch-1 bound it implies: every decoded token must read all
linear weights (lm_head included) plus the KV cache so far, so tokens/s <= bandwidth / bytes_per_token when all of
them come from memory. (Where the weights are not much larger than the last-level cache, part of them stays cached
from one step to the next and a step can beat that bound: `batch1_bytes_read_gb_s` then reads above
`bandwidth_gb_s`.) `python_overhead` is the share of decode time spent
outside the model's forward pass (sampling, the per-row state machine, streaming text). Decode figures exclude the
prompt's prefill (reported on its own as prefill tokens/s).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from picochat.common import autodetect_device, measure_matmul_flops, pick_dtype
from picochat.config import ModelConfig, derive_model_config
from picochat.engine import Engine, GraphedSteps, SamplingParams
from picochat.model import GPT

from _env import stamp  # benchmarks/_env.py: machine, date, command


def measure_bandwidth(device, mb: int = 256, reps: int = 5) -> float:
    """Bytes/s of a large copy (read + write), the best of `reps`."""
    n = mb * 1024 * 1024 // 4
    a = torch.empty(n, device=device).fill_(1.0)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best


class _Tok:
    """Just enough tokenizer for random-weight benchmarking (no special behaviour beyond the ids)."""

    def __init__(self, vocab):
        self.vocab_size = vocab
        self.bos_id = vocab - 9

    def special_id(self, name):
        names = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                 "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
        return self.vocab_size - 9 + names.index(name)

    def is_special(self, i):
        return i >= self.vocab_size - 9

    def decode_bytes(self, ids):
        return bytes(65 + (i % 26) for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode()

    def encode(self, s):
        return [ord(c) % 200 for c in s]


def run(engine: Engine, prompt: list[int], n: int, new_tokens: int) -> tuple[float, float, float]:
    """One generate call -> (decode tokens/s, share of decode time outside the model's forward, prefill seconds).
    The decode figures leave the prompt's prefill out (it is timed, and reported, on its own) and the first token of
    each row with it: that token is sampled from the prefill's logits."""
    spent = {"decode": 0.0, "prefill": 0.0}

    def timed(name, inner):
        def call(*a, **k):
            t0 = time.perf_counter()
            out = inner(*a, **k)
            if engine.device.type == "cuda":  # the GPU runs behind the Python: wait for it, or the forward looks free
                torch.cuda.synchronize()
            spent[name] += time.perf_counter() - t0
            return out
        return call

    engine.decode_one_token = timed("decode", Engine.decode_one_token.__get__(engine))
    engine.prefill = timed("prefill", Engine.prefill.__get__(engine))
    t0 = time.perf_counter()
    count = 0
    for events in engine.generate(prompt, n, SamplingParams(temperature=1.0, max_tokens=new_tokens, seed=0)):
        count += len(events)
    dt = time.perf_counter() - t0
    del engine.decode_one_token, engine.prefill  # back to the class's methods
    decode_s = dt - spent["prefill"]
    return (count - n) / decode_s, 1 - spent["decode"] / decode_s, spent["prefill"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default="", help="checkpoint stage (base/mid/sft/rl); empty = random weights")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="compile the decode step (Engine(compile=True))")
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "true", "false"],
                   help="replay the decode step as CUDA graphs (auto = when compiled on CUDA, the engine's default)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the fastest is reported")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto = the engine's own choice (engine.inference_dtype: bf16 on CUDA, and on CPUs with "
                        "native bf16 when compiled; fp32 otherwise)")
    args = p.parse_args(argv)
    device = autodetect_device(args.device)
    torch.manual_seed(0)
    if args.source:
        from picochat.checkpoint import load_model

        model, tok, _ = load_model(args.source, device=device)
    else:
        cfg = derive_model_config(ModelConfig(depth=args.depth, head_dim=args.head_dim, vocab_size=args.vocab_size,
                                              sequence_len=args.max_seq_len))
        model = GPT(cfg).to(device)
        model.init_weights(0)
        with torch.no_grad():  # zero output projections would make every step identical; use random ones
            for blk in model.blocks:
                blk.attn.c_proj.weight.normal_(0, 0.02)
                blk.mlp.c_proj.weight.normal_(0, 0.02)
        tok = _Tok(args.vocab_size)
    cfg = model.config
    requested = None if args.dtype == "auto" else pick_dtype(device, args.dtype)
    graphs = {"auto": None, "true": True, "false": False}[args.cuda_graphs]
    engine = Engine(model, tok, compile=args.compile, dtype=requested, cuda_graphs=graphs)
    dtype = engine.dtype
    prompt = [int(x) for x in torch.randint(0, cfg.vocab_size - 9, (args.prompt_len,))]

    run(engine, prompt, 1, 8)  # warm-up (and compile)
    run(engine, prompt, args.samples, 8)
    # prefill: a long prompt at batch 1, timed alone
    long_prompt = prompt * max(1, (cfg.sequence_len // 2) // len(prompt))
    prefill_tok_s = len(long_prompt) / min(run(engine, long_prompt, 1, 1)[2] for _ in range(args.repeats))

    # best of --repeats: a shared 2-core VM shows +-20% run-to-run noise, and the best run is the machine's figure
    # the bandwidth right before and right after the batch-1 runs, the higher one taken (the stricter bound): this
    # VM's memory switches between a ~45 and a ~75 GB/s state for minutes at a time, and one reading at the end of
    # the run could come from the other state
    bw_before = measure_bandwidth(device)
    tok_s_1, over_1, _ = max(run(engine, prompt, 1, args.new_tokens) for _ in range(args.repeats))
    bw = max(bw_before, measure_bandwidth(device))
    tok_s_n, over_n, _ = max(run(engine, prompt, args.samples, args.new_tokens) for _ in range(args.repeats))

    elem = 2 if dtype == torch.bfloat16 else 4
    linear = sum(p.numel() for p in model.blocks.parameters()) + model.lm_head.weight.numel()
    avg_ctx = args.prompt_len + args.new_tokens / 2
    cache_bytes = cfg.depth * 2 * cfg.n_kv_head * cfg.head_dim * avg_ctx * elem
    bytes_per_token = linear * elem + cache_bytes
    bound = bw / bytes_per_token
    useful_flops = 2 * linear + cfg.depth * 4 * cfg.n_head * cfg.head_dim * avg_ctx  # forward FLOPs per token
    peak = measure_matmul_flops("bfloat16" if dtype == torch.bfloat16 else "float32", device.type)
    print(json.dumps({
        **stamp(__file__, device, argv),
        "device": str(device), "depth": cfg.depth, "n_embd": cfg.n_embd, "vocab": cfg.vocab_size,
        "dtype": str(dtype).removeprefix("torch."), "compile": args.compile,
        "cuda_graphs": isinstance(engine.step, GraphedSteps),
        "aot_batch1": getattr(engine.step, "aot", None) is not None,  # batch 1 ran the ahead-of-time library
        "threads": torch.get_num_threads(),
        "prefill_tok_per_s": round(prefill_tok_s, 1),
        "decode_tok_per_s_batch1": round(tok_s_1, 1),
        f"decode_tok_per_s_{args.samples}_samples": round(tok_s_n, 1),
        "bandwidth_gb_s": round(bw / 1e9, 2), "batch1_bound_tok_per_s": round(bound, 1),
        "batch1_fraction_of_bound": round(tok_s_1 / bound, 3),
        # > bandwidth_gb_s (fraction > 1) when part of the weights stays in the CPU's last-level cache between steps
        "batch1_bytes_read_gb_s": round(tok_s_1 * bytes_per_token / 1e9, 2),
        "peak_gflops": round(peak / 1e9, 1),
        f"{args.samples}_samples_fraction_of_peak": round(tok_s_n * useful_flops / peak, 3),
        "python_overhead_batch1": round(over_1, 3),
        f"python_overhead_{args.samples}_samples": round(over_n, 3),
    }))


if __name__ == "__main__":
    main()
