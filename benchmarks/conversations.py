"""Conversation loader figures: what each packing policy costs, and what the rendering thread saves. Prints one
JSON line.

    PICOCHAT_BASE_DIR=... python benchmarks/conversations.py              # needs `picochat tok-train`
    python benchmarks/conversations.py --scale 0.1 --batches 40           # the README's figures

For the offline midtraining and SFT mixtures (picochat.tasks.mixtures, `--scale`), at T = 512 and 2,048, B = 8:
  pad_frac            "pad": the share of row tokens that are padding (rows end where no buffered piece fits),
  tail_targets_frac   "split": the share of targets that sit in a BOS-led tail piece (a conversation's rest after
                      the row it started in filled up: trained without the conversation's start), counted from the
                      batches themselves (a piece that does not start with <|user_start|> is a tail),
  supervised_frac     the share of target positions that are trained on (y != -1), under "pad",
  render_ms           rendering + splitting one batch's worth of conversations on the calling thread (what the
                      training thread would pay without the rendering thread),
  wait_ms             the time the training thread spends in next(loader) when each step releases the GIL for
                      `--step-ms` (as a GPU step waiting on CUDA does), with the rendering thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from picochat.data.conversations import ConversationLoader, task_pieces  # noqa: E402
from picochat.tasks.mixtures import midtrain_mixture, sft_mixture  # noqa: E402
from picochat.tokenizer import get_tokenizer  # noqa: E402

from _env import stamp  # noqa: E402 (benchmarks/_env.py: machine, date, command)


def tail_targets(tok, x, y) -> int:
    """Targets in BOS-led pieces that do not start a conversation or an exchange."""
    user_start, n = tok.special_id("<|user_start|>"), 0
    for xr, yr in zip(x.tolist(), y.tolist()):
        starts = [j for j, t in enumerate(xr) if t == tok.bos_id] + [len(xr)]
        for s, e in zip(starts, starts[1:]):
            first = xr[s + 1] if s + 1 < len(xr) else yr[s]
            if first not in (user_start, tok.bos_id, -1):
                n += sum(t != -1 for t in yr[s:e])
    return n


def measure(tok, mix, T: int, batches: int, step_ms: float) -> dict:
    out = {}
    for packing in ("pad", "split"):
        loader = ConversationLoader(tok, mix, B=8, T=T, packing=packing)
        tails = sup = 0
        for _ in range(batches):
            x, y = next(loader)
            tails += tail_targets(tok, x, y)
            sup += int((y != -1).sum())
        s = loader.stats()
        loader.close()
        if packing == "pad":
            out.update(pad_frac=round(s["pad_frac"], 4), supervised_frac=round(s["supervised_frac"], 4))
        else:
            out["tail_targets_frac"] = round(tails / max(1, sup), 4)
    # rendering on the calling thread, for as many conversations as one batch consumed on average
    per_batch = max(1, round(loader.epochs_done() * loader.per_pass / batches))
    t0 = time.perf_counter()
    for i in range(per_batch * 4):
        task_pieces(tok, mix, i % len(mix), T + 1)
    out["render_ms"] = round((time.perf_counter() - t0) / 4 * 1e3, 1)
    loader = ConversationLoader(tok, mix, B=8, T=T)
    next(loader)
    waited = 0.0
    for _ in range(batches):
        time.sleep(step_ms / 1e3)
        t0 = time.perf_counter()
        next(loader)
        waited += time.perf_counter() - t0
    loader.close()
    out["wait_ms"] = round(waited / batches * 1e3, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=0.1, help="mixture scale (picochat.tasks.mixtures)")
    ap.add_argument("--batches", type=int, default=40, help="batches measured per setting")
    ap.add_argument("--step-ms", type=float, default=60.0, help="simulated GIL-free step between batches")
    args = ap.parse_args()
    tok = get_tokenizer()
    out = {"scale": args.scale, "B": 8, "step_ms": args.step_ms}
    for name, make in (("mid", midtrain_mixture), ("sft", sft_mixture)):
        mix = make("train", scale=args.scale)
        out[name] = {"conversations": len(mix)}
        for T in (512, 2048):
            out[name][T] = measure(tok, mix, T, args.batches, args.step_ms)
    print(json.dumps({**stamp(__file__), **out}))


if __name__ == "__main__":
    main()
