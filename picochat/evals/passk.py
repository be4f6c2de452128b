"""The arithmetic of chat evaluation, apart from any model: pass@k from n samples, centred accuracy, ChatCORE.

    pass_at_k(n=10, c=3, k=5)          # 0.9166...: the chance that 5 of the 10 samples include a correct one
    centered(0.40, baseline=0.25)      # 0.2: how far from chance towards perfect
    chatcore({"arc_easy": 0.2, ...})   # ("chatcore", "ChatCORE", mean) or ("chatcore4", "ChatCORE-4 (no ...)", mean)
"""

from __future__ import annotations

# ChatCORE's six tasks (nanochat's chat report), as metric names, with the names people print
CHATCORE_TASKS = ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "spellingbee")
DISPLAY = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "mmlu": "MMLU", "gsm8k": "GSM8K",
           "humaneval": "HumanEval", "spellingbee": "SpellingBee"}


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate (Chen et al., 2021, "Evaluating Large Language Models Trained on Code") from n
    samples of which c are correct: 1 - C(n-c, k) / C(n, k), the chance that k of the n samples drawn without
    replacement include a correct one. Written as 1 - prod_{i=n-c+1}^{n} (1 - k/i), the paper's stable form: as
    floats the binomials overflow beyond n ~ 1,030 (C(1030, 515) > 1e308) and as integers they grow to hundreds of
    digits, while each factor stays in [0, 1]."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset holds a correct sample (this also covers c = n)
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def centered(accuracy: float, baseline: float) -> float:
    """(accuracy - baseline) / (1 - baseline): 0 at chance, 1 when perfect, negative below chance."""
    if not 0 <= baseline < 1:
        raise ValueError(f"baseline must be in [0, 1), got {baseline}")
    return (accuracy - baseline) / (1 - baseline)


def chatcore(centred_by_task: dict[str, float]) -> tuple[str, str, float]:
    """(metric key, printed name, value): the mean centred accuracy over the ChatCORE tasks present in
    `centred_by_task` (other keys are ignored). All six: ("chatcore", "ChatCORE", v). A subset is never given the
    full name: ("chatcore4", "ChatCORE-4 (no GSM8K, HumanEval)", v)."""
    present = [t for t in CHATCORE_TASKS if t in centred_by_task]
    if not present:
        raise ValueError(f"ChatCORE needs at least one of {', '.join(CHATCORE_TASKS)}")
    value = sum(centred_by_task[t] for t in present) / len(present)
    if len(present) == len(CHATCORE_TASKS):
        return "chatcore", "ChatCORE", value
    missing = ", ".join(DISPLAY[t] for t in CHATCORE_TASKS if t not in present)
    return f"chatcore{len(present)}", f"ChatCORE-{len(present)} (no {missing})", value
