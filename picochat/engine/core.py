"""The Engine: the model, the tokenizer's special ids, the tool, and the generation calls in gpt-fast's plainness.

    prefill(ids, cache, row)            -> logits (1, V)   the prompt at batch 1 into one cache row
    extend(ids, cache, row, pos)        -> logits (1, V)   more tokens into a row from `pos` (a tool's output block)
    decode_one_token(tokens, cache, positions, temperature, u) -> (logits (n, V), sampled (n,) or None)
    decode_n(tokens, cache, positions, temperature, u (k, n))  -> (k, n) tokens, each step's sample fed back
    generate(ids, n, params)            -> Events per step;  generate_batch(ids, n, params) -> (tokens, masks)
    score(ids, top)                     -> per-token logprobs and top alternatives

The decode step is one object chosen at construction (engine/steps.py): eager, compiled, or CUDA graphs of either.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import torch

from picochat.common import UserError, autocast_ctx
from picochat.engine.batch import Batch
from picochat.engine.cache import KVCache
from picochat.engine.rows import Event, Request, Specials
from picochat.engine.sampling import SamplingParams, sample_plain
from picochat.engine.steps import DecodeStep, inference_dtype, linear_weights, make_decode_step, with_weights


def check_prompt(ids: list[int], context: int) -> None:
    """A prompt must leave room for at least one generated token."""
    if not ids:
        raise UserError("prompt is empty")
    if len(ids) >= context:
        raise UserError(f"prompt is {len(ids)} tokens; the model's context is {context} "
                        f"(shorten the prompt or conversation)")


class Engine:
    """Owns the model, the tokenizer's special ids and the tool. Cheap to construct; caches are per batch."""

    def __init__(self, model, tokenizer, *, tool: Callable[[str], str] | None = None, compile: bool = False,
                 dtype: torch.dtype | None = None, cuda_graphs: bool | None = None):
        self.model = model.eval()
        self.tok = tokenizer
        self.tool = tool
        self.device = next(model.parameters()).device
        self.dtype = dtype or inference_dtype(self.device, compile)
        self.context = model.config.sequence_len
        sid = tokenizer.special_id
        self.specials = Specials(tokenizer.bos_id, sid("<|assistant_end|>"), sid("<|python_start|>"),
                                 sid("<|python_end|>"), sid("<|output_start|>"), sid("<|output_end|>"))
        self.bos, self.assistant_end = self.specials.bos, self.specials.assistant_end
        # the eager prefill of a compiled bf16 engine (and its ahead-of-time batch-1 step) reads bf16 copies of the
        # linear weights: autocast would cast every weight at every prefill (~40% of a short prompt's prefill at
        # depth 4), and casting once gives the same values. Only when compiled: its weights are frozen, an eager
        # engine's may still be training.
        self.cast_weights: dict[str, torch.Tensor] = {}
        if compile and self.dtype != torch.float32:
            self.cast_weights = {n: w.detach().to(self.dtype) for n, w in linear_weights(model).items()}
        # CUDA graphs: by default for a compiled engine on CUDA, i.e. a model that no longer trains (an eager graph
        # would read updated weights correctly, but training-time samples are few and short)
        if cuda_graphs is None:
            cuda_graphs = compile and self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise UserError(f"cuda_graphs=True needs a CUDA device; this model is on {self.device}")
        self.step: DecodeStep = make_decode_step(model, self.device, self.dtype, compile, cuda_graphs,
                                                 self.cast_weights, self.context)
        # a compiled step froze the weights: check_frozen refuses to sample after they changed
        self._versions = self._weight_versions() if compile else None
        # generate() decodes up to this many tokens per Python round trip (decode_n); the server's scheduler steps one
        # at a time so requests join and leave between tokens
        self.chunk = 8
        self._spare: KVCache | None = None  # generate()'s cache, kept for the next call
        self._bytes: list[bytes] | None = None  # token id -> bytes, specials -> b"" (built lazily: 8k-65k entries)

    # -- the forward passes -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def extend(self, ids: list[int], cache: KVCache, row: int, pos: int) -> torch.Tensor:
        """Run `ids` at batch 1 into `row` of the cache from position `pos`; returns the last position's logits
        (1, V). Eager (a compiled bf16 engine reads its cast weight copies)."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        with autocast_ctx(self.device, self.dtype):
            logits = with_weights(self.model, self.cast_weights)(
                x, kv_cache=cache.view(slice(row, row + 1), [pos]), last=True)
        return logits[:, -1]

    def prefill(self, ids: list[int], cache: KVCache, row: int) -> torch.Tensor:
        """Run the prompt at batch 1 into `row` of the cache; returns the last position's logits (1, V)."""
        return self.extend(ids, cache, row, 0)

    @torch.inference_mode()
    def prefill_batch(self, prompts: list[list[int]], cache: KVCache, first: int) -> torch.Tensor:
        """Prefill several prompts into rows first.. of the cache together -> last logits (m, V). One prompt is a
        plain prefill. Several: one forward over all but each prompt's last token (right-padded: the padding writes
        cache entries past a row's prompt, which its own decoding overwrites before it attends to them), then one
        over the last tokens at each row's own position (the head runs on one position per row either way)."""
        if len(prompts) == 1:
            return self.prefill(prompts[0], cache, first)
        m, T = len(prompts), max(len(p) for p in prompts) - 1
        rows = slice(first, first + m)
        run = with_weights(self.model, self.cast_weights)
        with autocast_ctx(self.device, self.dtype):
            if T > 0:
                body = torch.tensor([p[:-1] + [0] * (T - len(p) + 1) for p in prompts], device=self.device)  # (m, T)
                run(body, kv_cache=cache.view(rows, [0] * m), last=True)
            last = torch.tensor([[p[-1]] for p in prompts], device=self.device)  # (m, 1)
            logits = run(last, kv_cache=cache.view(rows, [len(p) - 1 for p in prompts]), last=True)
        return logits[:, -1]

    @torch.inference_mode()
    def decode_one_token(self, tokens: torch.Tensor, cache: KVCache, positions: list[int], temperature: torch.Tensor,
                         u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens (n,) for live rows 0..n-1 at their positions -> (logits (n, V), sampled (n,) or None).
        A compiled step also samples at `temperature` with uniforms `u` (n,) in its graph; eager returns None."""
        return self.step(tokens, cache, positions, temperature, u)

    @torch.inference_mode()
    def decode_n(self, tokens: torch.Tensor, cache: KVCache, positions: list[int], temperature: torch.Tensor,
                 u: torch.Tensor) -> torch.Tensor:
        """u.size(0) steps in one call, each step's temperature sample fed straight back as the next input, with no
        per-row Python in between -> (steps, n) tokens. u: (steps, n) uniforms. The caller keeps the tokens up to a
        row's first event (finish, tool call) and rolls that row's position back to there."""
        out = []
        for j in range(u.size(0)):
            logits, sampled = self.decode_one_token(tokens, cache, [p + j for p in positions], temperature, u[j])
            tokens = sample_plain(logits.float(), temperature, u[j]) if sampled is None else sampled
            out.append(tokens)
        return torch.stack(out)

    def new_cache(self, rows: int) -> KVCache:
        """A cache for `rows` rows, always of the whole context (the compiled step's guards include the cache's time
        length: its slices are views) and made of inference tensors: the compiled step then writes it in place, and
        every caller's cache has the same dispatch keys."""
        # on normal tensors the compiled step copied the cache slices it writes: a batch-1 step ran ~2x slower
        cfg = self.model.config
        with torch.inference_mode():
            return KVCache(cfg.depth, rows, self.context, cfg.n_kv_head, cfg.head_dim, self.device, self.dtype)

    @torch.inference_mode()
    def warmup(self, max_batch: int = 2) -> float:
        """Compile the decode graphs now (batch 1, and batch >= 2 when max_batch > 1) rather than on the first
        request; returns the seconds it took (about 0 without compile)."""
        t0 = time.perf_counter()
        self.step.warmup(self.new_cache(2), max_batch)
        return time.perf_counter() - t0

    def _weight_versions(self) -> list[int]:
        return [p._version for p in self.model.parameters()]

    def check_frozen(self) -> None:
        """A compiled engine baked the weights in; refuse to sample stale weights after they changed."""
        if self._versions is not None and self._weight_versions() != self._versions:
            raise RuntimeError("the model's weights changed after this compiled Engine was built (compile freezes "
                               "them); build a new Engine, or use compile=False for a model that is still training")

    def token_bytes(self, t: int) -> bytes:
        if self._bytes is None:
            self._bytes = [b"" if self.tok.is_special(i) else self.tok.decode_bytes([i])
                           for i in range(self.tok.vocab_size)]
        return self._bytes[t]

    def run_tool(self, code: str) -> str:
        """The tool's output for `code`; a tool must never take the engine down, so its error becomes the text."""
        try:
            return str(self.tool(code))
        except Exception as exc:  # noqa: BLE001
            return f"Error: {type(exc).__name__}: {exc}"

    # -- public API ---------------------------------------------------------------------------------------------------

    def check_prompt(self, ids: list[int]) -> None:
        check_prompt(ids, self.context)

    def check_score(self, ids: list[int], top: int = 0) -> None:
        """What `score` accepts: 1..context token ids of the vocabulary, 0 <= top <= vocab."""
        V = self.model.config.vocab_size
        if not ids:
            raise UserError("prompt to score is empty")
        if len(ids) > self.context:
            raise UserError(f"prompt to score is {len(ids)} tokens; the model's context is {self.context}")
        bad = next((t for t in ids if not 0 <= t < V), None)
        if bad is not None:
            raise UserError(f"token id {bad} is outside the vocabulary (0..{V - 1})")
        if not 0 <= top <= V:
            raise UserError(f"top={top} must be between 0 and the vocabulary size {V}")

    @torch.inference_mode()
    def score(self, ids: list[int], top: int = 0) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
        """Log-probability of each token given the ones before it (None for the first) and, per position, the `top`
        most likely (token, logprob) there ([] for the first): one forward over the whole prompt at batch 1, in the
        engine's dtype as prefill runs it, log-softmax in fp32. What an evaluation client scores choices with."""
        self.check_score(ids, top)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        with autocast_ctx(self.device, self.dtype):
            logits = with_weights(self.model, self.cast_weights)(x)  # (1, T, V)
        logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)  # (T-1, V): position i predicts token i+1
        target = torch.tensor(ids[1:], dtype=torch.long, device=self.device)
        picked = logp.gather(1, target[:, None])[:, 0].tolist()
        tops: list[list[tuple[int, float]]] = [[]]
        if top > 0:
            vals, idx = logp.topk(top, dim=-1)  # (T-1, top)
            tops += [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
        else:
            tops += [[] for _ in picked]
        return [None, *picked], tops

    def generate(self, prompt_ids: list[int], num_samples: int = 1,
                 params: SamplingParams | None = None) -> Iterator[list[Event]]:
        """Stream a request: yields the list of Events of each step until every row has finished."""
        params = params or SamplingParams()
        self.check_prompt(prompt_ids)
        out: list[Event] = []
        # reuse the last call's cache when it has the rows: a fresh one is zeroed and faulted in at every call
        # (~4% of a 128-token generate with 16 samples at depth 6). Stale entries are masked (a row attends only to
        # positions it has written) and finite (they are model outputs), so they add nothing.
        cache, self._spare = self._spare, None
        if cache is None or cache.k.size(1) < num_samples:
            cache = self.new_cache(num_samples)
        batch = Batch(self, max_rows=num_samples, cache=cache)
        try:
            batch.add([Request(0, list(prompt_ids), num_samples, params, out.append)])
            while batch.rows:
                batch.step(max_steps=self.chunk)
                if out:
                    yield list(out)
                    out.clear()
        finally:
            self._spare = cache

    def generate_batch(self, prompt_ids: list[int], num_samples: int = 1,
                       params: SamplingParams | None = None) -> tuple[list[list[int]], list[list[int]]]:
        """Whole completions and masks (1 = sampled, 0 = forced by a tool), without the terminal token and without
        the tokens that hold part of a stop string."""
        seqs: list[list[int]] = [[] for _ in range(num_samples)]
        masks: list[list[int]] = [[] for _ in range(num_samples)]
        for events in self.generate(prompt_ids, num_samples, params):
            for ev in events:
                if ev.token >= 0:
                    seqs[ev.row].append(ev.token)
                    masks[ev.row].append(0 if ev.forced else 1)
                if ev.drop:
                    del seqs[ev.row][-ev.drop:], masks[ev.row][-ev.drop:]
        return seqs, masks
