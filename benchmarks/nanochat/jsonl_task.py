"""A nanochat Task over a JSONL of {"messages": [...]} conversations: what benchmarks/nanochat_wallclock.py's patched
chat_sft trains on in place of its hub tasks (SmolTalk, MMLU, GSM8K), which are not available offline here. Imported
inside nanochat's venv (its `tasks` package on the path)."""

import json

from tasks.common import Task


class JSONLConversations(Task):
    def __init__(self, path, **kwargs):
        super().__init__(**kwargs)
        with open(path, encoding="utf-8") as f:
            self.rows = [json.loads(line) for line in f if line.strip()]

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        return self.rows[index]
