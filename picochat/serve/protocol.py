"""The OpenAI wire format as pure functions: request bodies -> checked requests, engine events -> response objects and
SSE chunks. Nothing here touches FastAPI, the event loop or the scheduler, so every rule is testable on plain dicts
(tests/test_serve.py); picochat/serve/app.py calls these from its routes.

Every check raises `ApiError` naming the parameter, the way OpenAI's API answers: {"error": {"message", "type",
"param", "code"}} with an HTTP status.
"""

from __future__ import annotations

import codecs
import json
import math
from dataclasses import dataclass, field

from picochat.engine import Event, SamplingParams
from picochat.tokenizer import SPECIAL_TOKENS as SPECIAL_NAMES

FENCE_OPEN = {"python": "```python\n", "python_output": "```output\n"}
FENCE_CLOSE = "\n```\n"
SEGMENT_PART = {"text": "text", "python": "python", "output": "python_output"}  # engine segment -> part type
MAX_STOP_STRINGS = 8
MAX_LOGPROBS = 20  # top alternatives per position; OpenAI's legacy API allows 5, vLLM 20
MAX_PROMPTS = 64  # prompts in one /v1/completions request (lm-eval sends its batch_size, default 1)

# OpenAI fields this server cannot honour: answered 400 instead of being silently ignored. Each maps to the check
# that its value is the neutral one (absent, null, off, empty), which clients often send explicitly.
UNSUPPORTED_CHAT = {
    "tools": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "functions": lambda v: v == [],
    "function_call": lambda v: v == "none",
    "response_format": lambda v: v == {"type": "text"},
    "logprobs": lambda v: v is False,
    "top_logprobs": lambda v: v == 0,
    "logit_bias": lambda v: v == {},
}
UNSUPPORTED_COMPLETION = {"logit_bias": UNSUPPORTED_CHAT["logit_bias"]}
UNSUPPORTED_COMPLETION["suffix"] = lambda v: v == ""
UNSUPPORTED_COMPLETION["best_of"] = lambda v: v == 1


class ApiError(Exception):
    """An error answered as an OpenAI error object with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    @property
    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------------------------
# request parsing


def number(body: dict, name: str, default, *, integer: bool = False, lo=None, hi=None, lo_open: bool = False):
    """body[name] as an int/float within [lo, hi] (lo excluded when lo_open); null or absent -> default."""
    v = body.get(name)
    if v is None:
        return default
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or (isinstance(v, float) and not math.isfinite(v)):
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind}, got {json.dumps(v)[:40]}", param=name)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ApiError(400, f"'{name}' must be {'>' if lo_open else '>='} {lo}, got {v}", param=name)
    if hi is not None and v > hi:
        raise ApiError(400, f"'{name}' must be <= {hi}, got {v}", param=name)
    return v


def boolean(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {json.dumps(v)[:40]}", param=name)
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a non-empty string or a list of non-empty strings", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' may hold at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
    return tuple(stops)


def check_supported(body: dict, unsupported: dict) -> None:
    """400 for a field we would otherwise silently ignore (a client asking for tools or JSON mode must know)."""
    for name, neutral in unsupported.items():
        v = body.get(name)
        if v is not None and not neutral(v):
            raise ApiError(400, f"'{name}' is not supported by this server (got {json.dumps(v)[:60]}); remove it",
                           param=name, code="unsupported_parameter")


def encode_with_specials(tokenizer, text: str) -> list[int]:
    """`text` as ids, with special-token names in it (e.g. "<|bos|>") as their ids: what vLLM's /tokenize does, and
    how lm-eval's remote tokenizer learns the BOS/EOS ids. Only /tokenize reads text this way; prompts never do."""
    specials = sorted(SPECIAL_NAMES, key=len, reverse=True)
    ids: list[int] = []
    i = 0
    while i < len(text):
        hits = [(text.find(s, i), s) for s in specials]
        at, name = min(((a, s) for a, s in hits if a >= 0), default=(-1, None))
        if at < 0:
            ids += tokenizer.encode(text[i:])
            break
        ids += tokenizer.encode(text[i:at]) if at > i else []
        ids.append(tokenizer.special_id(name))
        i = at + len(name)
    return ids


def check_model(body: dict, name: str) -> None:
    model = body.get("model")
    if model is None:
        return  # a missing model means the one we serve
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model")
    if model != name:
        raise ApiError(404, f"model '{model}' does not exist; this server serves '{name}'", param="model",
                       code="model_not_found")


@dataclass
class GenRequest:
    """What both completion endpoints hand to the scheduler (one prompt; /v1/completions may send several)."""

    prompt_ids: list[int]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool


@dataclass
class Limits:
    """The server's bounds on a request."""

    max_batch: int  # largest n
    max_tokens: int  # --max-tokens: default and cap of generated tokens
    context: int  # the model's context in tokens


def sampling(body: dict, prompt_ids: list[int], limits: Limits, param: str, allow_zero: bool = False) -> GenRequest:
    """The sampling fields of a chat or text completion, checked; max_tokens defaults to what fits (at most
    --max-tokens). allow_zero: max_tokens 0 is a request to score the prompt only (echo with logprobs)."""
    temperature = number(body, "temperature", 1.0, lo=0, hi=2)
    top_p = number(body, "top_p", None, lo=0, hi=1)
    top_k = number(body, "top_k", None, integer=True, lo=0)  # extension; 0 = off, as in most servers
    lo = 0 if allow_zero else 1
    max_tokens = number(body, "max_completion_tokens", None, integer=True, lo=lo)
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = number(body, "max_tokens", None, integer=True, lo=lo), "max_tokens"
    n = number(body, "n", 1, integer=True, lo=1, hi=limits.max_batch)
    seed = number(body, "seed", None, integer=True, lo=-(2**63), hi=2**64 - 1)  # what torch generators accept
    stream = boolean(body, "stream", False)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}", param="stream_options")
    include_usage = boolean(opts or {}, "include_usage", False)
    room = limits.context - len(prompt_ids)
    if room < 1 and not (allow_zero and max_tokens == 0):
        raise ApiError(400, f"This model's maximum context length is {limits.context} tokens. However, your prompt "
                            f"is {len(prompt_ids)} tokens and the reply needs at least one: shorten the input",
                       param=param, code="context_length_exceeded")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise ApiError(400, f"'{name}' is too large: {max_tokens}. This server generates at most {limits.max_tokens} "
                            f"tokens per reply (serve --max-tokens)", param=name)
    if max_tokens is not None and max_tokens > room:
        # OpenAI's wording, so clients that parse it (to retry with less) work here too
        raise ApiError(400, f"This model's maximum context length is {limits.context} tokens. However, you requested "
                            f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, {max_tokens} in "
                            f"the completion). Please reduce the length of the prompt or completion.",
                       param=name, code="context_length_exceeded")
    params = SamplingParams(
        # top_p = 0 keeps only the most likely token (OpenAI accepts it): that is greedy decoding
        temperature=0.0 if top_p == 0 else float(temperature),
        top_k=top_k or None,
        top_p=None if top_p is None or top_p == 0 or top_p >= 1 else float(top_p),
        max_tokens=min(limits.max_tokens, room) if max_tokens is None else max_tokens,
        seed=seed,
        stop=_stop(body),
        # OpenAI's range; applied to the tokens this reply sampled (engine/sampling.py)
        frequency_penalty=float(number(body, "frequency_penalty", 0.0, lo=-2.0, hi=2.0)),
        presence_penalty=float(number(body, "presence_penalty", 0.0, lo=-2.0, hi=2.0)),
    )
    return GenRequest(prompt_ids, params, n, stream, include_usage)


def _text_of(content, where: str) -> str:
    """A system/user content: a string, or OpenAI's list of {"type": "text", "text": ...} parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    raise ApiError(400, f"'{where}' must be a string or a list of text parts", param=where)


def _parts_of(content) -> list[dict]:
    """An assistant content as the tokenizer's parts: a list keeps picochat_parts (text/python/python_output)."""
    if content is None:
        return []
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def conversation(body: dict) -> dict:
    """The request's messages as the tokenizer's conversation dict: alternating user/assistant turns, user first.

    The tokenizer knows one system message, merged into the first user turn. OpenAI clients send more: `developer`
    (the newer name for system), system messages anywhere, several user (or assistant) messages in a row. So every
    system/developer text is put in front of the next user message (after the last user message: appended to it),
    and consecutive messages of one role are joined with a blank line, as the tokenizer joins system and user."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required: a non-empty list of {role, content} objects", param="messages")
    turns: list[dict] = []
    system: list[str] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object with 'role' and 'content'", param=where)
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"'{where}.role' is {json.dumps(role)[:40]}; use 'system', 'developer', 'user' or "
                                f"'assistant'", param=f"{where}.role")
        if role == "assistant":
            if content is not None and not isinstance(content, (str, list)):
                raise ApiError(400, f"'{where}.content' must be a string or a list of parts", param=f"{where}.content")
            if not turns:
                raise ApiError(400, f"'{where}': an assistant message before any user message cannot be rendered; "
                                    f"start with a user (or system) message", param="messages")
            if turns[-1]["role"] == "assistant":
                turns[-1]["content"] += _parts_of(content)
            else:
                turns.append({"role": "assistant", "content": _parts_of(content)})
            continue
        text = _text_of(content, f"{where}.content")
        if role in ("system", "developer"):
            system.append(text)
            continue
        text = "\n\n".join([*system, text])
        system = []
        if turns and turns[-1]["role"] == "user":
            turns[-1]["content"] += "\n\n" + text
        else:
            turns.append({"role": "user", "content": text})
    if not turns or turns[-1]["role"] != "user":
        raise ApiError(400, "the last message must be from the user (the server writes the assistant's reply)",
                       param="messages")
    if system:
        turns[-1]["content"] = "\n\n".join([turns[-1]["content"], *system])
    return {"messages": turns}


def prompts(body: dict, vocab_size: int, encode) -> tuple[list[list[int]], bool]:
    """/v1/completions `prompt`: a string, a list of token ids, or a list of either (several prompts). Strings are
    encoded by `encode` (BOS + text); token arrays are used exactly as given, so an evaluation harness scores the
    tokens it chose. Returns (id lists, whether they came as strings)."""
    p = body.get("prompt")
    usage = ("'prompt' is required: a string, a list of token ids, or a list of strings or token-id lists")
    if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) for t in p)):
        p = [p]
    if not isinstance(p, list) or not p:
        raise ApiError(400, usage, param="prompt")
    if len(p) > MAX_PROMPTS:
        raise ApiError(400, f"'prompt' holds {len(p)} prompts; at most {MAX_PROMPTS} per request", param="prompt")
    as_text = all(isinstance(x, str) for x in p)
    out = []
    for x in p:
        if isinstance(x, str) and as_text:
            out.append(encode(x))
        elif (isinstance(x, list) and x and not as_text
              and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in x)):
            out.append(list(x))
        else:
            raise ApiError(400, f"{usage}; token ids must be integers in [0, {vocab_size}) and one request may not "
                                f"mix strings with token lists", param="prompt")
    return out, as_text


# ---------------------------------------------------------------------------------------------------------------------
# response shaping


class RowText:
    """Assembles one sample row's reply: content deltas (tool segments fenced), the parts list and its token ids."""

    def __init__(self):
        self.segment = "text"
        self.content = ""
        self.parts: list[dict] = []
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    def feed(self, ev: Event) -> list[dict]:
        """The deltas this event adds: {"content", "picochat_segment"[, "picochat_markup"]}. An "error" finish adds
        none: its text is the engine's exception, for the server log only (app.py logs it)."""
        if ev.token >= 0:
            self.token_ids.append(ev.token)
        out = self._switch(SEGMENT_PART.get(ev.segment, "text"))
        if ev.text and ev.finish_reason != "error":
            out.append(self._add(self.segment, ev.text, markup=False))
        if ev.finish_reason is not None:
            out += self._switch("text")
            self.finish_reason = ev.finish_reason
        return out

    def _switch(self, seg: str) -> list[dict]:
        if seg == self.segment:
            return []
        out = []
        if self.segment != "text":
            out.append(self._add(self.segment, FENCE_CLOSE, markup=True))
        if seg != "text":
            lead = "" if self.content == "" or self.content.endswith("\n") else "\n"
            out.append(self._add(seg, lead + FENCE_OPEN[seg], markup=True))
        self.segment = seg
        self.parts.append({"type": seg, "text": ""})
        return out

    def _add(self, seg: str, text: str, markup: bool) -> dict:
        self.content += text
        if not markup:
            if not self.parts or self.parts[-1]["type"] != seg:
                self.parts.append({"type": seg, "text": ""})
            self.parts[-1]["text"] += text
        delta = {"content": text, "picochat_segment": seg}
        if markup:
            delta["picochat_markup"] = True
        return delta

    def final_parts(self) -> list[dict]:
        return [p for p in self.parts if p["type"] != "text" or p["text"]]

    def plain_text(self) -> str:
        return "".join(p["text"] for p in self.parts)


ENGINE_FAILED = "the engine failed while generating; see the server log"


def finish(reason: str | None) -> str:
    if reason == "error":
        raise ApiError(500, ENGINE_FAILED, type="server_error")
    return "length" if reason == "length" else "stop"


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# sent in place of further chunks when a row fails mid-stream (the 200 and its headers are gone by then)
SSE_ENGINE_ERROR = sse(ApiError(500, ENGINE_FAILED, type="server_error").body)
SSE_DONE = "data: [DONE]\n\n"


def usage(prompt_tokens: int, rows: list[RowText]) -> dict:
    completion = sum(r.tokens for r in rows)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


@dataclass
class ChatChunks:
    """SSE chunks of one streamed chat completion: `start()`, `feed(event)` per event, `end()` after the last."""

    head: dict  # id, created, model
    n: int
    prompt_tokens: int
    include_usage: bool
    rows: list[RowText] = field(init=False)

    def __post_init__(self):
        self.head = {**self.head, "object": "chat.completion.chunk"}
        self.rows = [RowText() for _ in range(self.n)]

    def _chunk(self, index: int, delta: dict, reason: str | None = None) -> str:
        return sse({**self.head, "choices": [{"index": index, "delta": delta, "finish_reason": reason}]})

    def start(self) -> list[str]:
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(self.n)]

    def feed(self, ev: Event) -> list[str]:
        out = [self._chunk(ev.row, d) for d in self.rows[ev.row].feed(ev)]
        if ev.finish_reason is not None:
            out.append(self._chunk(ev.row, {}, finish(ev.finish_reason)))
        return out

    def end(self) -> str:
        tail = sse({**self.head, "choices": [], "usage": usage(self.prompt_tokens, self.rows)}) if self.include_usage \
            else ""
        return tail + SSE_DONE


@dataclass
class TextChunks(ChatChunks):
    """SSE chunks of one streamed text completion (/v1/completions)."""

    def __post_init__(self):
        self.head = {**self.head, "object": "text_completion"}
        self.rows = [RowText() for _ in range(self.n)]

    def start(self) -> list[str]:
        return []

    def feed(self, ev: Event) -> list[str]:
        self.rows[ev.row].feed(ev)
        reason = finish(ev.finish_reason) if ev.finish_reason is not None else None
        if not ev.text and reason is None:
            return []
        return [sse({**self.head, "choices": [{"index": ev.row, "text": ev.text, "logprobs": None,
                                                "finish_reason": reason}]})]


def chat_response(head: dict, prompt_tokens: int, rows: list[RowText]) -> dict:
    choices = [{"index": i, "finish_reason": finish(r.finish_reason),
                "message": {"role": "assistant", "content": r.content, "picochat_parts": r.final_parts()}}
               for i, r in enumerate(rows)]
    return {**head, "object": "chat.completion", "choices": choices, "usage": usage(prompt_tokens, rows)}


def text_response(head: dict, tokenizer, reqs: list[GenRequest], rows: list[list[RowText]],
                  scores: list | None, echo: bool) -> dict:
    """A non-streamed /v1/completions response: choice i * n + j is prompt i's sample j; with `echo` its text and
    logprobs start at the prompt; `scores` holds Engine.score of each prompt + completion (None: no logprobs)."""
    choices, prompt_tokens = [], 0
    for i, (r, rs) in enumerate(zip(reqs, rows)):
        prompt_tokens += len(r.prompt_ids)
        prompt_text = tokenizer.decode(r.prompt_ids)
        for j, row in enumerate(rs):
            logprobs = None
            if scores is not None:
                lps, tops = scores[i * r.n + j]
                start = 0 if echo else len(r.prompt_ids)
                ids = (r.prompt_ids + row.token_ids)[start:]
                logprobs = logprobs_object(tokenizer, ids, lps[start:], tops[start:], 0 if echo else len(prompt_text))
            choices.append({"index": i * r.n + j, "text": (prompt_text if echo else "") + row.plain_text(),
                            "logprobs": logprobs,
                            # a row that never ran (max_tokens 0: scoring only) ended at its length limit
                            "finish_reason": "length" if row.finish_reason is None else finish(row.finish_reason)})
    completion = sum(row.tokens for rs in rows for row in rs)
    return {**head, "object": "text_completion", "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion}}


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each token's own text; a token that is not whole UTF-8 on its own (part of a character) is written as its
    bytes, "bytes:\\xe2\\x80", as OpenAI's API does, so different tokens never share a name in top_logprobs."""
    out = []
    for t in ids:
        b = tokenizer.decode_bytes([t])
        try:
            out.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            out.append("bytes:" + "".join(f"\\x{c:02x}" for c in b))
    return out


def text_offsets(tokenizer, ids: list[int], start: int) -> list[int]:
    """Where each token's text starts in the decoded text of `ids` (a token inside a character: where that character
    starts), counted from `start`."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offsets, at = [], start
    for t in ids:
        offsets.append(at)
        at += len(dec.decode(tokenizer.decode_bytes([t])))
    return offsets


def logprobs_object(tokenizer, ids: list[int], token_logprobs: list[float | None],
                    top: list[list[tuple[int, float]]], text_start: int) -> dict:
    """OpenAI's legacy `choices[i].logprobs` for `ids`: tokens, token_logprobs, top_logprobs ({token: logprob}, the
    chosen token included as vLLM does; None where nothing predicts the token, i.e. the first one) and text_offset
    (each token's start in the choice's text, from `text_start`)."""
    tokens = token_strings(tokenizer, ids)
    tops = []
    for i, (alts, lp) in enumerate(zip(top, token_logprobs)):
        if lp is None:
            tops.append(None)
            continue
        d = dict(zip(token_strings(tokenizer, [t for t, _ in alts]), (v for _, v in alts)))
        d.setdefault(tokens[i], lp)
        tops.append(d)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
            "text_offset": text_offsets(tokenizer, ids, text_start)}
