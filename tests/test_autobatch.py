"""`--device-batch-size auto`: the flag's parser, the GPU presets' default, a CPU pretraining run that uses the start
size and records the number (which --resume and a chat stage then use), the expected-time line against FLOPs worked
out here from the model's shape, and the probe's size search with a fake memory predicate. Then the benchmarks'
machine and date fields (benchmarks/_env.py) on a real decode.py line, and benchmarks/table.py's rows from it."""

import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from picochat.config import PRETRAIN_PRESETS, PretrainConfig, SFTConfig, parse_config
from test_train import base, pretrain  # noqa: F401 (base: a fixture)


def _parse(cls, argv):
    return parse_config(cls, argv, prog="picochat pretrain", presets=PRETRAIN_PRESETS)[0]


def test_device_batch_size_takes_a_number_or_auto(capsys):
    assert _parse(PretrainConfig, ["--device-batch-size", "auto"]).device_batch_size == "auto"
    assert _parse(PretrainConfig, ["--device-batch-size", "AUTO"]).device_batch_size == "auto"
    assert _parse(PretrainConfig, ["--device-batch-size", "24"]).device_batch_size == 24
    assert _parse(PretrainConfig, []).device_batch_size == 16
    for bad, why in (("big", "expected a whole number or auto, got 'big'"), ("0", "expected a number >= 1 or auto")):
        with pytest.raises(SystemExit) as e:
            _parse(PretrainConfig, ["--device-batch-size", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"error: argument --device-batch-size: {why}" in err and "Traceback" not in err
    with pytest.raises(SystemExit):  # a chat stage inherits its parent's number and takes no auto
        _parse(SFTConfig, ["--device-batch-size", "auto"])
    assert "invalid int value: 'auto'" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        _parse(PretrainConfig, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--device-batch-size N|auto" in text and "or auto: on CUDA the largest that fits" in text

    # the GPU presets probe, from the sizes they used to fix; the CPU preset keeps its number
    d20, d26 = _parse(PretrainConfig, ["--preset", "d20"]), _parse(PretrainConfig, ["--preset", "d26"])
    assert (d20.device_batch_size, d20.auto_batch_start) == ("auto", 32)
    assert (d26.device_batch_size, d26.auto_batch_start) == ("auto", 16)
    assert _parse(PretrainConfig, ["--preset", "cpu"]).device_batch_size == 16
    assert _parse(PretrainConfig, ["--preset", "d20", "--device-batch-size", "8"]).device_batch_size == 8


def test_resolve_refuses_a_bad_value_in_one_line():
    from picochat.common import UserError
    from picochat.train.autobatch import resolve_device_batch_size

    cpu = torch.device("cpu")
    assert resolve_device_batch_size(PretrainConfig(device_batch_size=3), None, 64, 1, cpu, None) == 3
    with pytest.raises(UserError, match=r"^device_batch_size must be a number >= 1 or 'auto', got 'big'$"):
        resolve_device_batch_size(PretrainConfig(device_batch_size="big"), None, 64, 1, cpu, None)


def test_pretrain_auto_on_cpu_uses_the_start_and_records_it(base, tmp_path, capsys):  # noqa: F811
    import shutil

    from picochat.train import midtrain

    shutil.rmtree(base / "checkpoints", ignore_errors=True)
    auto = ["--device-batch-size", "auto", "--auto-batch-start", "2", "--eval-every", "0", "--sample-every", "-1"]
    summary = pretrain(auto + ["--num-steps", "4", "--stop-at", "2"], tmp_path / "a.jsonl")
    out = capsys.readouterr().out
    assert "device batch size auto: 2 (--auto-batch-start; no memory probe on cpu)" in out
    assert "device_batch_size        = 2" in out  # the logged config holds the number
    assert summary["tokens_per_step"] == 512  # TINY's 512-token steps: 4 micro-batches of 2 x 64
    meta = json.loads((base / "checkpoints" / "base" / "d2" / "step_000002" / "meta.json").read_text())
    assert meta["run_config"]["device_batch_size"] == 2 and meta["auto_batch"] == {"start": 2, "chosen": 2}

    # a resume keeps the checkpoint's number, whatever the start says now
    pretrain(auto[:2] + ["--auto-batch-start", "8", "--num-steps", "4", "--resume", "--eval-every", "0",
                         "--sample-every", "-1"], tmp_path / "b.jsonl")
    assert "device batch size auto: 2 (the resumed checkpoint's)" in capsys.readouterr().out
    meta = json.loads((base / "checkpoints" / "base" / "d2" / "step_000004" / "meta.json").read_text())
    assert meta["run_config"]["device_batch_size"] == 2

    # a chat stage inherits the number, not "auto"
    mid = midtrain.run(["--tasks", "identity:40", "--val-conversations", "4", "--mc-eval", "", "--eval-every", "0",
                        "--sample-every", "-1", "--num-steps", "1", "--device", "cpu", "--dtype", "fp32",
                        "--metrics", str(tmp_path / "mid.jsonl")])
    assert "mid.device_batch_size: inherited 2" in capsys.readouterr().out and mid["tokens_per_step"] == 512
    shutil.rmtree(base / "checkpoints", ignore_errors=True)


def _seconds(text: str) -> float:
    """report.render.fmt_time's text back to seconds: '12.5 s', '3.2 min' or '5 h 07 min'."""
    if m := re.fullmatch(r"(\d+) h (\d+) min", text):
        return int(m[1]) * 3600 + int(m[2]) * 60
    value, unit = text.split()
    return float(value) * {"s": 1, "min": 60}[unit]


def test_expected_time_follows_from_the_flops_and_the_assumed_mfu():
    from picochat.common import Runtime
    from picochat.model import GPT
    from picochat.train.autobatch import ASSUMED_MFU
    from picochat.train.pretrain import expected, model_config_for

    cfg = PretrainConfig(depth=2, n_embd=64, head_dim=16, max_seq_len=64, total_batch_size=512, max_minutes=5)
    model = GPT(model_config_for(cfg, 300))
    steps = 20_000_000
    line = expected(cfg, model, Runtime(torch.device("cpu"), torch.float32), steps)

    # worked out from the shape: per block q, k, v, o (C x C each) and the MLP (C x 4C, 4C x C) = 12 C^2 weights,
    # plus lm_head at the real vocabulary, 6 FLOPs per weight and token (forward + backward); causal attention
    # over T = 64 averages (T + 1) / 2 keys a query, 2 products of 2 FLOPs per (head dim, key), x3 for training
    C, L, T, V = 64, 2, 64, 300
    linear = 6 * (L * 12 * C * C + V * C)
    assert sum(p.numel() for p in model.blocks.parameters()) == L * 12 * C * C  # no other block weights
    flops_per_token = linear + L * 3 * 4 * C * (T + 1) / 2
    tokens = steps * 512
    m = re.fullmatch(r"expected: (\S+) FLOPs \((\S+)/token x (\S+) tokens\) on 1 x cpu at (\S+) TFLOP/s peak each "
                     r"and (\d+)% MFU: (.+), ~\$0\.00 at \$0 per device-hour \(--max-minutes 5 may end it sooner\)",
                     line)
    assert m, line
    assert float(m[2]) == pytest.approx(flops_per_token, rel=5e-3)  # printed to 3 significant figures
    assert float(m[3]) == pytest.approx(tokens, rel=5e-3)
    assert float(m[1]) == pytest.approx(flops_per_token * tokens, rel=5e-3)
    assert int(m[5]) / 100 == ASSUMED_MFU["cpu"] == 0.2
    peak = float(m[4]) * 1e12  # the measured peak, 3 figures: the time below is good to ~0.5%
    assert 1e9 < peak < 1e15
    assert _seconds(m[6]) == pytest.approx(flops_per_token * tokens / (peak * 0.2), rel=1e-2)


def test_the_probe_takes_the_largest_size_that_fits_and_divides_the_step():
    from picochat.train.autobatch import candidate_sizes, largest_that_fits

    # d12 on one GPU from the preset's 32: doubled up to one micro-batch per 524,288-token step, then halved
    sizes = candidate_sizes(32, 2048, 524288, 1)
    assert sizes == [256, 128, 64, 32, 16, 8, 4, 2, 1]
    tried = []

    def fits(rows: int) -> bool:  # a card whose memory holds 100 rows of 2,048 tokens
        tried.append(rows)
        return rows * 2048 <= 100 * 2048

    assert largest_that_fits(sizes, fits) == 64 and tried == [256, 128, 64]  # stops at the first that fits
    # 4 ranks: each rank's micro-batch is a quarter of what one rank could take
    assert candidate_sizes(32, 2048, 524288, 4) == [64, 32, 16, 8, 4, 2, 1]
    # a start above one micro-batch per step is not tried; an odd start keeps the halvings that divide the step
    assert candidate_sizes(512, 2048, 524288, 1) == [256, 128, 64, 32, 16, 8, 4, 2, 1]
    assert candidate_sizes(6, 128, 128 * 24, 1) == [24, 12, 6, 3, 1]
    assert largest_that_fits(candidate_sizes(6, 128, 128 * 24, 1), lambda rows: rows < 5) == 3
    assert largest_that_fits([8, 4, 2, 1], lambda rows: False) is None
    # d20 on 8 GPUs: at most 32 rows per micro-batch; a start whose multiples do not divide the step keeps only 1
    assert candidate_sizes(32, 2048, 524288, 8) == [32, 16, 8, 4, 2, 1]
    assert candidate_sizes(12, 256, 12288, 1) == [48, 24, 12, 6, 3, 1]  # 48 rows of 256 = the whole step
    assert candidate_sizes(12, 256, 8192, 1) == [1]  # 8,192 / 256 = 32 rows: no multiple of 3 divides it


def test_auto_batch_on_cpu_keeps_the_given_size(capsys):
    import contextlib

    from conftest import make_tiny_model
    from picochat.train.autobatch import auto_device_batch_size

    model = make_tiny_model(vocab_size=320, depth=1, n_embd=32, sequence_len=64)
    before = [p.detach().clone() for p in model.parameters()]
    assert auto_device_batch_size(model, 16, 64, 4096, 1, torch.device("cpu"), contextlib.nullcontext) == 16
    assert "device batch size auto: 16 (--auto-batch-start; no memory probe on cpu)" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no probe step touched the weights


def test_expected_time_and_cost():
    from picochat.train.autobatch import describe_expected, expected_time_cost

    # 6e9 FLOPs/token x 1e9 tokens = 6e18 FLOPs over 8 x 1e15 FLOP/s at 20%: 3,750 s; 8 GPUs x 3,750 s at $3/h = $25
    seconds, usd = expected_time_cost(6e9, 1e9, 1e15, 8, 0.2, 3.0)
    assert seconds == pytest.approx(3750) and usd == pytest.approx(25.0)
    assert expected_time_cost(6e9, 1e9, 1e15, 8, 0.2, None)[1] is None
    line = describe_expected(6e9, 1e9, 1e15, 8, "cuda", "NVIDIA H100 80GB HBM3")
    assert line == ("expected: 6e+18 FLOPs (6e+09/token x 1e+09 tokens) on 8 x NVIDIA H100 80GB HBM3 at 1e+03 TFLOP/s "
                    "peak each and 20% MFU: 62.5 min, ~$24.92 at $2.99 per device-hour")
    assert describe_expected(6e9, 1e9, 1e15, 1, "cuda", "Some GPU", mfu=0.5).endswith(
        "at 1e+03 TFLOP/s peak each and 50% MFU: 3 h 20 min, no cost estimate (no built-in price for this GPU)")


# -- benchmarks: every JSON line says where and when; benchmarks/table.py renders the README's table ----------------

ROOT = Path(__file__).resolve().parent.parent


def test_a_benchmark_line_says_where_and_when_and_becomes_a_table_row(tmp_path, capsys):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICOCHAT_")}
    env.update(PICOCHAT_BASE_DIR=str(tmp_path), PICOCHAT_AOT_CACHE="off")
    args = ["--depth", "1", "--head-dim", "16", "--vocab-size", "256", "--max-seq-len", "64", "--prompt-len", "8",
            "--new-tokens", "8", "--samples", "2", "--repeats", "1", "--device", "cpu", "--dtype", "fp32"]
    r = subprocess.run([sys.executable, "benchmarks/decode.py", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout.strip().splitlines()[-1])

    # the machine as /proc/cpuinfo and the scheduler say, today's UTC date, the command as typed in the repo root
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), None)
    flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
    units = "+".join(sorted({"avx512_bf16", "amx_bf16"} & set(flags))) or "no native bf16"
    assert line["machine"] == f"{cpu}, {len(os.sched_getaffinity(0))} cores, {units}"
    assert line["date"] == datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    assert line["benchmark"] == "decode" and isinstance(line["load"], float)
    assert line["command"] == "PICOCHAT_AOT_CACHE=off python benchmarks/decode.py " + " ".join(args)
    assert line["aot_batch1"] is False and line["decode_tok_per_s_batch1"] > 0

    # an older line without the stamp (a key tells its benchmark) gets "-" for what it does not say
    old = {"settings": {"random": True, "depth": 4, "max_tokens": 64},
           "levels": [{"concurrency": 8, "tokens_per_s": 4394.4, "ttft_p50_ms": 21.2, "ttft_p95_ms": 32.0}]}
    (tmp_path / "figures.jsonl").write_text(json.dumps(line) + "\nserver ready: {...}\n" + json.dumps(old) + "\n")
    table_py = _module(ROOT / "benchmarks" / "table.py")
    assert table_py.main([str(tmp_path / "figures.jsonl")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[:2] == ["| what | figure | machine | date | command |", "| --- | --- | --- | --- | --- |"]
    row = (f"| decode batch 1, d1 vocab 256, float32 eager | {line['decode_tok_per_s_batch1']:,.0f} tok/s "
           f"({line['batch1_fraction_of_bound']:.0%} of the bandwidth bound) | {line['machine']}, load "
           f"{line['load']:g} | {line['date']} | `{line['command']}` |")
    assert row in table
    assert any(t.startswith("| decode 2 samples, d1 vocab 256, float32 eager | ") for t in table)
    assert ("| serving, 8 clients, random d4, 64 tokens per request | 4,394 tok/s, TTFT p50 21 / p95 32 ms "
            "| - | - | - |") in table
    assert len(table) == 2 + 3 + 1  # batch 1, 2 samples and prefill of the decode line; one serving level

    # the ahead-of-time library serves batch 1 only: the batched rows of the same line are the compiled engine's
    aot = {**line, "compile": True, "aot_batch1": True}
    assert [what for what, *_ in table_py.rows([json.dumps(aot)])] == [
        "decode batch 1, d1 vocab 256, float32 AOT", "decode 2 samples, d1 vocab 256, float32 compiled",
        "prefill, d1 vocab 256, float32 compiled"]

    assert table_py.main([str(tmp_path / "nothing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "benchmarks/table.py: no file" in err


def _module(path: Path):
    """A benchmarks/ script as a module (benchmarks/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
