"""Runs INSIDE nanochat's venv (cwd = its tree, PYTHONPATH = its tree and picochat's root); called by
benchmarks/nanochat_wallclock.py. Prints one JSON line.

    python nano_side.py bpb --model-tag T --docs N --seq-len 512 [--corpus default]
    python nano_side.py chat --model-tag T --prompts prompts.json --max-tokens 64

bpb: nanochat's base checkpoint, its tokenizer and its own evaluate_bpb (nanochat/loss_eval.py) over the first N
documents of OUR corpus's validation split, read by picochat's own reader and packed by picochat's own packer
(picochat.data.loader: the rule of picochat's ValidationSlice, BOS-led rows of T+1, a document's rest continues in the
next row led by a BOS, every token a target once), so both models are scored on the same text in the same order.
chat: greedy replies of nanochat's SFT checkpoint through its own Engine (calculator on, as its chat CLI), the prompt
rendered as its chat CLI renders one (bos, user_start, text, user_end, assistant_start).
"""

from __future__ import annotations

import argparse
import json
from itertools import islice

import numpy as np
import torch


def bpb(args) -> dict:
    from nanochat.checkpoint_manager import load_model
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import get_token_bytes
    from picochat.data.corpus import iter_documents
    from picochat.data.loader import Packer, pack_all, shift

    device = torch.device("cpu")
    model, tok, meta = load_model("base", device, phase="eval", model_tag=args.model_tag)
    bos = tok.get_bos_token_id()
    texts = list(islice(iter_documents("val", args.corpus), args.docs))
    docs = [np.asarray(ids, dtype=np.int64) for ids in tok.encode(texts, prepend=bos, num_threads=4)]
    feed = iter(enumerate(docs))

    def pull():
        got = next(feed, None)
        return None if got is None else ((0, got[0]), got[1])

    T = args.seq_len
    rows, _, filled = pack_all(Packer("split", 1, 0, bos), pull, T + 1, bos)  # rows (N, T+1)
    x, y = shift(rows, np.arange(T + 1) < filled[:, None])  # (N, T) each; the unfilled tail of the last row is -1
    B = args.batch_size
    batches = ((torch.from_numpy(np.ascontiguousarray(x[a:a + B])), torch.from_numpy(np.ascontiguousarray(y[a:a + B])))
               for a in range(0, len(x), B))
    steps = -(-len(x) // B)
    value = evaluate_bpb(model, batches, steps, get_token_bytes(device=device))
    return {"bpb": value, "docs": len(texts), "tokens": int(sum(len(d) for d in docs)), "rows": len(x), "T": T,
            "step": meta["step"]}


def chat(args) -> dict:
    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine

    device = torch.device("cpu")
    model, tok, meta = load_model("sft", device, phase="eval", model_tag=args.model_tag)
    engine = Engine(model, tok)
    sp = tok.encode_special
    end = sp("<|assistant_end|>")
    replies = []
    for q in json.loads(open(args.prompts).read()):
        prompt = [tok.get_bos_token_id(), sp("<|user_start|>"), *tok.encode(q), sp("<|user_end|>"),
                  sp("<|assistant_start|>")]
        out = [col[0] for col, _ in engine.generate(prompt, num_samples=1, max_tokens=args.max_tokens,
                                                    temperature=0.0)]
        body = out[:-1] if out and out[-1] in (end, tok.get_bos_token_id()) else out
        replies.append({"prompt": q, "reply": tok.decode(body), "tokens": len(out),
                        "ended": bool(out) and out[-1] == end})
    return {"replies": replies, "step": meta["step"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["bpb", "chat"])
    p.add_argument("--model-tag", required=True)
    p.add_argument("--docs", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--corpus", default="default")
    p.add_argument("--prompts", default="")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    print(json.dumps(bpb(args) if args.what == "bpb" else chat(args)))


if __name__ == "__main__":
    main()
