"""Live rows of one KV cache, stepped together: `Engine.generate` runs one request in a Batch, the server's Scheduler
(serve/scheduler.py) runs every request in one.

A step: rows whose tool output arrived are fed it in one forward pass each (`Engine.extend`) and sample from its last
logits; then every live row advances one token (or up to `max_steps` with `Engine.decode_n`); rows waiting for a
tool sit in the decode step (the batch stays contiguous) but keep their position; finished rows leave, the last row
moving into each hole so live rows stay in [0, n).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Callable

import torch

from picochat.engine.cache import KVCache
from picochat.engine.rows import Request, Row, TextStream, Uniforms
from picochat.engine.sampling import penalize, sample_rows

if TYPE_CHECKING:
    from picochat.engine.core import Engine

# run_tool(code, deliver): run the engine's tool on `code` and call deliver(result text), now or later, on any thread
ToolRunner = Callable[[str, Callable[[str], None]], None]


class Batch:
    """Rows [0, len(rows)) of `cache`; see the module docstring. `run_tool` defaults to running the tool inline."""

    def __init__(self, engine: Engine, max_rows: int, cache: KVCache | None = None,
                 run_tool: ToolRunner | None = None):
        self.e = engine
        self.max_rows = max_rows
        self.cache = cache if cache is not None else engine.new_cache(max_rows)
        self.rows: list[Row] = []
        self.run_tool = run_tool or (lambda code, deliver: deliver(engine.run_tool(code)))
        self._outputs: deque[tuple[Row, str]] = deque()  # tool results, appended from any thread
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        return self.max_rows - len(self.rows)

    @property
    def busy(self) -> bool:
        """Whether a step has work: a row that decodes, or a tool output to feed."""
        return bool(self._outputs) or any(not r.waiting for r in self.rows)

    @torch.inference_mode()
    def add(self, reqs: list[Request]) -> None:
        """Prefill the requests' prompts into the first free rows (together when several: `Engine.prefill_batch`),
        copy each prompt's cache into its request's other rows (after those), sample every row's first token."""
        e = self.e
        e.check_frozen()
        first, m = len(self.rows), len(reqs)
        logits = e.prefill_batch([r.prompt for r in reqs], self.cache, first)  # (m, V), rows first..first+m-1

        def row(req: Request, i: int) -> Row:
            p = req.params
            return Row(req, i, len(req.prompt), TextStream(p.stop), Uniforms(p.seed, i, p.temperature))

        new_rows, row_logits = [row(req, 0) for req in reqs], list(logits)
        for j, req in enumerate(reqs):  # the other samples' rows follow the m prefilled ones
            for i in range(1, req.n):
                self.cache.copy_row(first + j, first + len(new_rows), len(req.prompt))
                new_rows.append(row(req, i))
                row_logits.append(logits[j])
        self.rows.extend(new_rows)
        self._sample_and_accept(new_rows, torch.stack(row_logits))

    @torch.inference_mode()
    def step(self, max_steps: int = 1) -> None:
        """Feed tool outputs that arrived, decode every live row by one token (or up to `max_steps` with decode_n
        when no row waits for a tool or filters its sampling), then drop the finished rows."""
        e = self.e
        for r in self.rows:
            if r.request.cancelled:
                r.finish("cancelled")
        self._feed_outputs()
        self._compact()
        live = [r for r in self.rows if not r.waiting]
        if live:
            k = self._steps(max_steps)
            tokens = torch.tensor([r.feed[-1] for r in self.rows], dtype=torch.long, device=e.device)
            positions = [r.pos for r in self.rows]
            temps = self._temperatures(self.rows)
            u = self._uniforms(self.rows, k)  # (k, n)
            if k == 1:
                logits, sampled = e.decode_one_token(tokens, self.cache, positions, temps, u[0])
                for r in live:
                    r.pos, r.feed = r.pos + 1, []
                self._sample_and_accept(self.rows, logits, sampled, temps, u[0])
            else:
                chunk = e.decode_n(tokens, self.cache, positions, temps, u).t().tolist()  # (n, k)
                for r, toks in zip(self.rows, chunk):
                    for t in toks:  # keep tokens up to the row's first event; its later cache entries are masked
                        r.pos, r.feed = r.pos + 1, []
                        r.uniforms.take(1)
                        self._accept(r, t)
                        if r.done or r.waiting:
                            break
        self._compact()

    def fail(self, text: str) -> None:
        """End every row with an "error" finish (a step raised)."""
        for r in self.rows:
            r.finish("error", text)
        self._compact()

    def _steps(self, max_steps: int) -> int:
        """How many tokens this step may decode per row: 1 while a row waits for a tool or samples with top-k/top-p
        or a penalty (eager sampling is not in the compiled graph), else up to max_steps within every row's token
        budget and the context."""
        if max_steps <= 1 or any(r.waiting or r.request.params.eager for r in self.rows):
            return 1
        room = min(min(r.request.params.max_tokens - r.produced, self.e.context - 1 - r.pos) for r in self.rows)
        return max(1, min(max_steps, room))

    def _uniforms(self, rows: list[Row], k: int) -> torch.Tensor:
        """(k, n): the next k uniforms of each row, from its own generator."""
        return torch.tensor(list(zip(*(r.uniforms.peek(k) for r in rows))), dtype=torch.float32, device=self.e.device)

    def _temperatures(self, rows: list[Row]) -> torch.Tensor:
        return torch.tensor([r.request.params.temperature for r in rows], dtype=torch.float32, device=self.e.device)

    def _sample_and_accept(self, rows: list[Row], logits: torch.Tensor, sampled: torch.Tensor | None = None,
                           temps: torch.Tensor | None = None, u: torch.Tensor | None = None) -> None:
        """Pick each row's token (the compiled step's own sample unless a row samples eagerly: top-k, top-p, a
        penalty) and run the state machine of the rows that are decoding (a waiting row's sample is ignored)."""
        params = [r.request.params for r in rows]
        if temps is None:
            temps = self._temperatures(rows)
            u = self._uniforms(rows, 1)[0]
        if sampled is None or any(p.eager for p in params):
            logits = logits.float()
            if any(p.penalized for p in params):
                # text only: code repeats its tokens by nature (12*12), and a penalized <|python_start|> would
                # discourage the next tool call
                logits = penalize(logits, [r.sampled if r.segment == "text" else {} for r in rows], params)
            sampled = sample_rows(logits, temps, [p.top_k for p in params], [p.top_p for p in params], u)
        for r, t in zip(rows, sampled.tolist()):
            if not r.done and not r.waiting:
                r.uniforms.take(1)
                self._accept(r, t)

    def _accept(self, r: Row, t: int, forced: bool = False) -> None:
        e = self.e
        code = r.accept(t, forced, e.specials, e.token_bytes(t), e.context)
        if code is not None and e.tool is not None:
            r.waiting = True
            self.run_tool(e.tok.decode(code), lambda out, r=r: self._deliver(r, out))

    def _deliver(self, r: Row, output: str) -> None:
        with self._lock:
            self._outputs.append((r, output))

    def _feed_outputs(self) -> None:
        """Rows whose tool finished: accept the output block as forced tokens (events, budget), then ONE forward
        pass over the row's unfed tokens (<|python_end|> and the block) and a sample from its last logits."""
        with self._lock:
            ready, self._outputs = list(self._outputs), deque()
        e, sp = self.e, self.e.specials
        for r, output in ready:
            r.waiting = False
            if r.done:  # cancelled while its tool ran
                continue
            for t in [sp.output_start, *e.tok.encode(output), sp.output_end]:
                self._accept(r, t, forced=True)
                if r.done:
                    break
            if r.done:
                continue
            logits = e.extend(r.feed, self.cache, self.rows.index(r), r.pos)  # (1, V)
            r.pos, r.feed = r.pos + len(r.feed), []
            self._sample_and_accept([r], logits)

    def _compact(self) -> None:
        """Move the last live row into each finished row's slot so live rows stay in [0, n)."""
        i = 0
        while i < len(self.rows):
            if self.rows[i].done:
                last = len(self.rows) - 1
                if i != last:
                    self.cache.copy_row(last, i, self.rows[last].pos)
                    self.rows[i] = self.rows[last]
                self.rows.pop()
            else:
                i += 1
