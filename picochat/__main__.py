"""`picochat <command> [flags]` and `python -m picochat <command>`: one command table, each entry a module whose
`main(argv=None)` runs the stage. `picochat <command> --help` shows that stage's flags.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module with main(argv), one-line description). The README's command list is checked against this.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("picochat.data.prepare", "build parquet corpus shards: embedded offline text, hub shards, or your files"),
    "tok-train": ("picochat.tok_train", "train the BPE tokenizer on the corpus"),
    "tok-eval": ("picochat.tok_eval", "compare compression (bytes/token) with the GPT-2 and GPT-4 tokenizers"),
    "pretrain": ("picochat.train.pretrain", "pretrain the base model (single process or torchrun)"),
    "midtrain": ("picochat.train.midtrain", "midtrain base -> mid: conversations, multiple choice, tool use"),
    "sft": ("picochat.train.sft", "supervised fine-tuning mid (or base) -> sft, loss on assistant tokens only"),
    "rl": ("picochat.train.rl", "reinforcement learning sft -> rl with GRPO on tasks with a reward"),
    "eval": ("picochat.evals.run", "evaluate: base (bpb, CORE, HellaSwag) or chat (ARC, MMLU, GSM8K, ...)"),
    "report": ("picochat.report", "write the run's report card (markdown + plots); report reset starts a new one"),
    "export": ("picochat.export", "export a checkpoint for Hugging Face transformers (safetensors + config)"),
    "speedrun": ("picochat.speedrun", "the whole pipeline in one resumable command (--preset cpu|d12|d20|d26)"),
    "chat": ("picochat.serve.chat_cli", "chat with a trained model in the terminal"),
    "serve": ("picochat.serve.app", "web chat UI and OpenAI-compatible API"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: picochat <command> [flags]   (picochat <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"picochat: error: unknown command '{cmd}'; run 'picochat --help' for the list", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    rc = module.main(rest)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
