"""`picochat chat`: talk to a trained model in the terminal, tokens printed as they are sampled.

    picochat chat                                  # the latest checkpoint (rl > sft > mid > base), multi-turn
    picochat chat --source sft --temperature 0.8
    picochat chat -p "Why is the sky blue?"        # one-shot: print the reply and exit (for scripts)
    python -m picochat.serve.chat_cli --help

In the interactive loop, `/clear` starts a new conversation and `/exit` (or Ctrl-D) quits; Ctrl-C stops the reply
being generated. When the model calls the python tool, the call and the tool's output are shown apart from the
reply: labelled and coloured when stdout is a terminal, as ```python / ```output fenced blocks otherwise (the same
rendering the API puts in message content). This runs the Engine in-process; it does not need `picochat serve`.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import TextIO

from picochat.common import UserError, run_main
from picochat.config import CheckpointSource, f, parse_config
from picochat.engine import Engine, Event, SamplingParams
from picochat.serve.protocol import SEGMENT_PART
from picochat.tools import TOOL_HELP, TOOL_KINDS

# C0 controls but tab and newline, DEL, and C1 controls (\x9b is a one-byte CSI on some terminals): what the model or
# a tool could use to drive the user's terminal (clear it, retitle it, overwrite a line after \r)
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
HELP = "commands: /clear (new conversation), /exit (quit); Ctrl-C stops a reply"


@dataclass
class ChatConfig(CheckpointSource):
    temperature: float = f(0.6, "sampling temperature; 0 = greedy")
    top_k: int = f(50, "sample among the k most likely tokens; 0 = all")
    frequency_penalty: float = f(0.0, "minus this x times already sampled, on each token's logit (OpenAI's, -2..2)")
    presence_penalty: float = f(0.0, "minus this on the logit of every token already sampled (OpenAI's, -2..2)")
    max_tokens: int = f(512, "most tokens per reply")
    seed: int | None = f(None, "sampling seed for reproducible replies")
    tool: str = f("calculator", TOOL_HELP, choices=list(TOOL_KINDS))


def printable(text: str) -> str:
    """`text` with terminal control characters shown as escapes ("\x1b"), so model and tool output cannot act on
    the terminal; newlines and tabs are kept."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class ReplyPrinter:
    """Writes one reply's events to `out` (control characters escaped: `printable`) and collects it as tokenizer
    parts [{"type", "text"}] with the model's text unchanged."""

    STYLE = {"python": ("\033[36m", "[python] "), "python_output": ("\033[2;32m", "[output] ")}  # cyan, dim green
    RESET = "\033[0m"

    def __init__(self, out: TextIO, color: bool):
        self.out, self.color = out, color
        self.segment = "text"
        self.parts: list[dict] = [{"type": "text", "text": ""}]
        self.written = ""  # the tail of what was written, to know whether a fence needs a leading newline
        self.finish_reason: str | None = None

    def feed(self, ev: Event) -> None:
        seg = SEGMENT_PART.get(ev.segment, "text")
        if seg != self.segment:
            self._switch(seg)
        if ev.text:
            self.parts[-1]["text"] += ev.text
            self._write(printable(ev.text))
        if ev.finish_reason is not None:
            self._switch("text")
            self.finish_reason = ev.finish_reason

    def _switch(self, seg: str) -> None:
        if seg == self.segment:
            return
        if self.segment != "text":
            self._write(self.RESET if self.color else "\n```\n")
        if seg != "text":
            lead = "" if not self.written or self.written.endswith("\n") else "\n"
            if self.color:
                code, label = self.STYLE[seg]
                self._write(lead + code + label)
            else:
                self._write(lead + ("```python\n" if seg == "python" else "```output\n"))
        elif self.color:
            self._write("\n")
        self.segment = seg
        self.parts.append({"type": seg, "text": ""})

    def _write(self, s: str) -> None:
        self.out.write(s)
        self.out.flush()
        self.written = (self.written + s)[-2:]

    def reply_parts(self) -> list[dict]:
        return [p for p in self.parts if p["type"] != "text" or p["text"]]


def stream_reply(engine: Engine, conversation: dict, params: SamplingParams, out: TextIO, color: bool) -> list[dict]:
    """Generate the assistant's next turn for `conversation`, printing it as it comes; returns its parts. Ctrl-C
    stops generation early and keeps what was printed."""
    prompt = engine.tok.render_for_completion(conversation)
    printer = ReplyPrinter(out, color)
    try:
        for events in engine.generate(prompt, 1, params):
            for ev in events:
                printer.feed(ev)
    except KeyboardInterrupt:
        printer._switch("text")
        out.write(" [stopped]")
    if printer.finish_reason == "length":
        print(f"\n(reply cut at --max-tokens {params.max_tokens} or the context limit)", file=sys.stderr)
    out.write("\n")
    out.flush()
    return printer.reply_parts()


def interactive(engine: Engine, params: SamplingParams, out: TextIO, color: bool) -> None:
    conversation: dict = {"messages": []}
    print(f"picochat chat: {HELP}", file=out, flush=True)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/clear":
            conversation = {"messages": []}
            print("(conversation cleared)", file=out, flush=True)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {HELP}", file=out, flush=True)
            continue
        conversation["messages"].append({"role": "user", "content": line})
        out.write("picochat> ")
        try:
            parts = stream_reply(engine, conversation, params, out, color)
        except UserError as e:  # the conversation no longer fits the context: keep the session alive
            conversation["messages"].pop()
            print(f"\n(error: {e}; type /clear to start over)", file=out, flush=True)
            continue
        conversation["messages"].append({"role": "assistant", "content": parts})


def _run(argv: list[str] | None) -> None:
    from picochat.checkpoint import load_model
    from picochat.tools import make_tool

    def extra(parser):
        parser.add_argument("-p", "--prompt", default=None, help="one-shot: print the reply to this prompt and exit")

    cfg, _, ns = parse_config(ChatConfig, argv, prog="picochat chat", description=__doc__.split("\n")[0], extra=extra)
    if cfg.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {cfg.temperature}")
    if cfg.max_tokens < 1 or cfg.top_k < 0:
        raise UserError("--max-tokens must be >= 1 and --top-k >= 0")
    if not (abs(cfg.frequency_penalty) <= 2 and abs(cfg.presence_penalty) <= 2):
        raise UserError("--frequency-penalty and --presence-penalty must be between -2 and 2")
    model, tokenizer, meta = load_model(cfg.source, step=cfg.step, run=cfg.run or None, device=cfg.device)
    # on stderr: stdout may be a one-shot reply that a script reads
    print(f"picochat chat: loaded {meta['source']} run '{meta['run'] or '(old layout)'}' step {meta['step']}",
          file=sys.stderr, flush=True)
    engine = Engine(model, tokenizer, tool=make_tool(cfg.tool), compile=cfg.compile)
    engine.warmup(1)  # compiles now when --compile, else a no-op
    params = SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k or None, max_tokens=cfg.max_tokens,
                            seed=cfg.seed, frequency_penalty=cfg.frequency_penalty,
                            presence_penalty=cfg.presence_penalty)
    color = sys.stdout.isatty()
    if ns.prompt is not None:
        stream_reply(engine, {"messages": [{"role": "user", "content": ns.prompt}]}, params, sys.stdout, color)
        return
    interactive(engine, params, sys.stdout, color)


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
