"""Serving throughput and latency: start the real server in a child process, drive it over HTTP with 1, 8 and 32
concurrent streaming clients, print ONE JSON line with aggregate completion tokens/s and p50/p95 time to first token
per concurrency level.

    python benchmarks/serve.py --random                  # random CPU-preset-shaped model (depth 4), no checkpoint
    python benchmarks/serve.py --source sft              # a trained checkpoint, served by `python -m picochat serve`
    python benchmarks/serve.py --random --concurrency 1,4 --max-tokens 32 --requests-per-client 1   # quick look
    python benchmarks/serve.py --random --prompt-lens 16,64,160     # TTFT under load with long and short prompts

The server runs in its own process (so the clients' Python does not compete with the scheduler thread for the GIL);
with --random the child is this script again, building the model in-process and calling `create_app`. Every request
is a chat completion with temperature 1.0, so a random model rarely stops before --max-tokens. Progress goes to
stderr; the JSON line to stdout.

--prompt-lens: each request's prompt is made that many tokens long (cycling through the list across clients and
requests; lengths measured with the server's /tokenize), so a level mixes short and long prefills the way real
traffic does; with short identical prompts a prefill stall cannot show. TTFT percentiles are also given per length.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: make the picochat package importable
    sys.path.insert(0, str(REPO))

from picochat.common import UserError, autodetect_device, run_main  # noqa: E402
from picochat.config import f, parse_config  # noqa: E402

from _env import stamp  # noqa: E402 (benchmarks/_env.py: machine, date, command)


@dataclass
class BenchConfig:
    random: bool = f(False, "serve a random model of the CPU preset's shape instead of a checkpoint")
    source: str = f("auto", "checkpoint stage when not --random: auto, base, mid, sft or rl")
    step: int | None = f(None, "checkpoint step (default: latest)")
    depth: int = f(4, "--random model depth (the CPU preset's)")
    sequence_len: int = f(256, "--random model context (the CPU preset's)")
    device: str = f("auto", "server device: auto, cpu, cuda")
    concurrency: str = f("1,8,32", "comma-separated numbers of concurrent streaming clients, one level each")
    requests_per_client: int = f(2, "sequential requests each client makes per level")
    max_tokens: int = f(64, "completion tokens per request")
    prompt_lens: str = f("", "comma-separated prompt lengths in tokens, mixed across requests (e.g. 16,64,160); "
                             "empty: a short prompt (~15 tokens) for every request")
    max_batch: int = f(32, "server --max-batch")
    threads: int = f(0, "server --threads (0: all cores but one)")
    compile: bool = f(True, "server --compile (the decode step compiled at startup, as `picochat serve` does)")
    engine_process: str = f("auto", "server --engine-process: auto (own process on CPU), true, false",
                            choices=["auto", "true", "false"])  # app.ENGINE_PROCESS
    startup_timeout: float = f(300.0, "seconds to wait for the server to answer /health")
    child_port: int = f(0, "internal: run as the --random server child on this port")


# ---------------------------------------------------------------------------------------------------------------------
# the server side (child process)


def random_model_and_tokenizer(cfg: BenchConfig):
    """The trained tokenizer if one exists (realistic vocab), else a small one trained on picochat's own sources."""
    from picochat.config import ModelConfig
    from picochat.model import GPT
    from picochat.tokenizer import Tokenizer, get_tokenizer

    try:
        tok = get_tokenizer()
    except UserError:
        texts = [p.read_text(encoding="utf-8") for p in sorted((REPO / "picochat").rglob("*.py"))]
        tok = Tokenizer.train(texts, vocab_size=1024)
    model = GPT(ModelConfig(depth=cfg.depth, head_dim=64, vocab_size=tok.vocab_size, sequence_len=cfg.sequence_len))
    model.init_weights(seed=0)
    return model, tok


def serve_child(cfg: BenchConfig) -> None:
    import uvicorn

    from picochat.common import autodetect_device
    from picochat.serve.app import ENGINE_PROCESS, create_app, set_model_threads
    from picochat.tools import make_tool

    device = autodetect_device(cfg.device)
    set_model_threads(device, cfg.threads)
    model, tok = random_model_and_tokenizer(cfg)
    model = model.to(device).eval()
    app = create_app(model, tok, max_batch=cfg.max_batch, max_queue=1024, max_tokens=cfg.max_tokens,
                     tool=make_tool("calculator"), source="random", compile=cfg.compile,
                     engine_process=ENGINE_PROCESS[cfg.engine_process])
    uvicorn.run(app, host="127.0.0.1", port=cfg.child_port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cfg: BenchConfig, port: int, log) -> subprocess.Popen:
    if cfg.random:
        cmd = [sys.executable, __file__, "--child-port", str(port), "--depth", str(cfg.depth),
               "--sequence-len", str(cfg.sequence_len), "--device", cfg.device, "--max-tokens", str(cfg.max_tokens),
               "--max-batch", str(cfg.max_batch), "--compile", str(cfg.compile).lower(), "--threads", str(cfg.threads),
               "--engine-process", cfg.engine_process]
    else:
        cmd = [sys.executable, "-m", "picochat", "serve", "--source", cfg.source, "--port", str(port),
               "--device", cfg.device, "--max-batch", str(cfg.max_batch), "--max-queue", "1024",
               "--max-tokens", str(cfg.max_tokens), "--compile", str(cfg.compile).lower(), "--threads", str(cfg.threads),
               "--engine-process", cfg.engine_process]
        if cfg.step is not None:
            cmd += ["--step", str(cfg.step)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float, log_path: str) -> dict:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Path(log_path).read_text(errors="replace")[-2000:]
            raise UserError(f"the server exited with status {proc.returncode} before it was ready:\n{tail}")
        try:
            return httpx.get(url + "/health", timeout=2).json()
        except httpx.TransportError:
            time.sleep(0.25)
    raise UserError(f"the server did not answer {url}/health within {timeout:.0f}s")


# ---------------------------------------------------------------------------------------------------------------------
# the client side


WORDS = ("river stone garden window light market paper winter cloud music forest letter bridge candle orange "
         "silver harbor meadow engine planet").split()


def sized_prompts(url: str, lens: list[int], context: int, max_tokens: int) -> dict[int, list[str]]:
    """For each length, 8 different user messages whose rendered chat prompt is exactly (or just under) that many
    tokens, by bisection on the number of words with the server's /tokenize."""
    import httpx

    def length(text: str) -> int:
        r = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": text}]}, timeout=30)
        return r.json()["count"]

    out = {}
    for L in lens:
        if L + max_tokens > context:
            raise UserError(f"--prompt-lens {L} + --max-tokens {max_tokens} do not fit the model's context {context}")
        out[L] = []
        for k in range(8):
            words = [WORDS[(k * 7 + i * (k + 3)) % len(WORDS)] for i in range(4 * L)]
            lo, hi = 1, len(words)  # the largest word count whose prompt is <= L tokens
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if length(" ".join(words[:mid])) <= L else (lo, mid - 1)
            out[L].append(" ".join(words[:lo]))
    return out


async def one_request(client, url: str, max_tokens: int, prompt: str) -> tuple[float, float, int]:
    """(time to first content token s, total s, completion tokens) for one streamed chat completion."""
    body = {"messages": [{"role": "user", "content": prompt}], "temperature": 1.0, "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise UserError(f"request failed with HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return (ttft if ttft is not None else total), total, tokens


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) used so far by this process, or by process `pid` and its live descendants (the
    server's engine process) (Linux /proc; 0.0 elsewhere)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    stats = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(d.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime (ticks)
    tree = {pid}
    grew = True  # add children until none is left out (a child's pid may be lower than its parent's)
    while grew:
        grew = False
        for p, (ppid, _) in stats.items():
            if ppid in tree and p not in tree:
                tree.add(p)
                grew = True
    ticks = sum(stats[p][1] for p in tree if p in stats)
    return ticks / os.sysconf("SC_CLK_TCK")


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))]


async def run_level(url: str, concurrency: int, per_client: int, max_tokens: int, server_pid: int,
                    prompts: dict[int, list[str]] | None = None) -> dict:
    import httpx

    lens = sorted(prompts) if prompts else []

    def prompt(i: int, j: int) -> tuple[int, str]:
        if not lens:
            return 0, f"Tell me a story, number {i}.{j}."
        L = lens[(i + j) % len(lens)]
        return L, prompts[L][(i * per_client + j) % len(prompts[L])]

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker(i: int) -> list[tuple[float, float, int, int]]:
            out = []
            for j in range(per_client):
                L, text = prompt(i, j)
                out.append((*await one_request(client, url, max_tokens, text), L))
            return out

        t0, c0, s0 = time.perf_counter(), cpu_seconds(), cpu_seconds(server_pid)
        results = [r for rs in await asyncio.gather(*(worker(i) for i in range(concurrency))) for r in rs]
        wall = time.perf_counter() - t0
        client_cpu, server_cpu = cpu_seconds() - c0, cpu_seconds(server_pid) - s0
    ttfts = [r[0] for r in results]
    tokens = sum(r[2] for r in results)
    by_len = {}
    for L in lens:
        xs = [r[0] for r in results if r[3] == L]
        if xs:
            by_len[str(L)] = {"ttft_p50_ms": round(1000 * percentile(xs, 0.50), 1),
                              "ttft_p95_ms": round(1000 * percentile(xs, 0.95), 1), "requests": len(xs)}
    return {"concurrency": concurrency, "requests": len(results), "completion_tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "per_stream_tokens_per_s": round(sum(r[2] / r[1] for r in results) / len(results), 1),
            "ttft_p50_ms": round(1000 * percentile(ttfts, 0.50), 1),
            "ttft_p95_ms": round(1000 * percentile(ttfts, 0.95), 1),
            # cores busy on average: on a small machine the clients' own parsing competes with the server
            "server_cores": round(server_cpu / wall, 2), "client_cores": round(client_cpu / wall, 2),
            **({"ttft_by_prompt_len": by_len} if by_len else {})}


def _run(argv: list[str] | None) -> None:
    cfg, _, _ = parse_config(BenchConfig, argv, prog="benchmarks/serve.py", description=__doc__.split("\n")[0])
    if cfg.child_port:
        serve_child(cfg)
        return
    try:
        levels = [int(c) for c in cfg.concurrency.split(",") if c.strip()]
    except ValueError:
        raise UserError(f"--concurrency '{cfg.concurrency}' must be comma-separated integers like 1,8,32") from None
    if not levels or min(levels) < 1 or cfg.requests_per_client < 1 or cfg.max_tokens < 1:
        raise UserError("--concurrency levels, --requests-per-client and --max-tokens must be >= 1")
    try:
        lens = sorted({int(x) for x in cfg.prompt_lens.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--prompt-lens '{cfg.prompt_lens}' must be comma-separated integers like 16,64,160") from None
    if lens and lens[0] < 8:
        raise UserError("--prompt-lens must be >= 8 tokens (the chat template alone takes ~5)")
    if not cfg.random:
        from picochat.checkpoint import latest_source

        if cfg.source == "auto" and latest_source() is None:
            raise UserError("no checkpoint to serve; train one (`picochat pretrain`) or pass --random to benchmark a "
                            "random model of the CPU preset's shape")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile("w+", prefix="picochat-serve-bench-", suffix=".log", delete=False) as log:
        proc = start_server(cfg, port, log)
    try:
        health = wait_ready(url, proc, cfg.startup_timeout, log.name)
        print(f"server ready: {health}", file=sys.stderr, flush=True)
        prompts = sized_prompts(url, lens, health["context"], cfg.max_tokens) if lens else None
        # warm-up: first-call allocations, lazy tables
        asyncio.run(run_level(url, 1, 1, min(8, cfg.max_tokens), proc.pid))
        results = []
        for c in levels:
            r = asyncio.run(run_level(url, c, cfg.requests_per_client, cfg.max_tokens, proc.pid, prompts))
            print(f"concurrency {c:3d}: {r['tokens_per_s']:8.1f} tok/s  ttft p50 {r['ttft_p50_ms']:.0f} ms "
                  f"p95 {r['ttft_p95_ms']:.0f} ms  cores: server {r['server_cores']} client {r['client_cores']}",
                  file=sys.stderr, flush=True)
            results.append(r)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.unlink(log.name)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("child_port", "startup_timeout")}
    server = {k: health.get(k) for k in ("model", "source", "step", "context", "max_batch")}
    print(json.dumps({**stamp(__file__, autodetect_device(cfg.device), argv), "server": server,
                      "settings": settings, "levels": results}), flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
