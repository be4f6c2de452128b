"""In-context copying: how much better a model predicts the second copy of a random token sequence than the first.

A model with induction heads (attend to the token after the last occurrence of the current one, copy what followed)
predicts a repeated sequence almost exactly; one without them predicts it no better than the first time. Every tool
call the chat stages teach is a copy of the question (SpellingBee's word, a sum's operands), so this says whether a
model can make those calls at all; the CPU demo's model cannot (README: "Copying").

    from picochat.evals.copy import evaluate_copy
    result = evaluate_copy(model, tokenizer, device)   # {"metrics": {"copy_acc", "copy_gain"}, "tasks": {...}}

Sequences: BOS, then L random ordinary tokens (no special ones), then the same L again; L = 64, or less to fit the
context. Scored: the mean loss (nats/token) over positions 2..L of each copy (the first token of either copy cannot be
predicted) and the greedy accuracy over the second copy. copy_gain = first - second.
"""

from __future__ import annotations

import torch

from picochat.tokenizer import SPECIAL_TOKENS


def copy_sequences(vocab_size: int, n_special: int, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """(n, length) int64: random ids from the ordinary vocabulary [0, vocab_size - n_special), the same on every
    machine (its own seeded generator)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size - n_special, (n, length), generator=g)


@torch.no_grad()
def evaluate_copy(model, tokenizer, device, n: int = 32, length: int = 64, batch: int = 8, autocast=None) -> dict:
    was_training = model.training
    model.eval()
    L = min(length, (model.config.sequence_len - 1) // 2)
    rand = copy_sequences(tokenizer.vocab_size, len(SPECIAL_TOKENS), n, L)
    seqs = torch.cat([torch.full((n, 1), tokenizer.bos_id), rand, rand], dim=1).to(device)  # (n, 1 + 2L)
    x, y = seqs[:, :-1], seqs[:, 1:]  # y[:, j] is token j + 1: the first copy is y[:, :L], the second y[:, L:]
    first, second, hits = [], [], []
    for i in range(0, n, batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        if autocast is not None:
            with autocast():
                logits = model(xb)
        else:
            logits = model(xb)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (b, 2L, V)
        nll = -logp.gather(-1, yb[..., None])[..., 0]  # (b, 2L)
        first.append(nll[:, 1:L])
        second.append(nll[:, L + 1 :])
        hits.append(logp[:, L + 1 :].argmax(-1) == yb[:, L + 1 :])
    model.train(was_training)
    f, s = torch.cat(first).mean().item(), torch.cat(second).mean().item()
    acc = torch.cat(hits).float().mean().item()
    return {"metrics": {"copy_acc": acc, "copy_gain": f - s},
            "tasks": {"copy": {"first_nats": f, "second_nats": s, "acc": acc, "n": n, "length": L}}}
