"""Checkpoints: atomic save/load of model weights, per-rank optimizer shards, per-rank loader state and meta.

Layout: <base>/checkpoints/<stage>/<run>/step_000100/{model.pt, optim_rank0.pt, ..., loader_rank0.json, ...,
meta.json} with stage in base | mid | sft | rl and run a name (`--run`; pretraining's default is the depth tag, e.g.
d4). A run owns its folder: keep-last-K deletes only its own older steps, and a fresh training run refuses a folder
that already holds checkpoints unless told `--resume` or `--overwrite` (without runs, a fresh 60-step run next to an
older run's steps 120 and 180 saved its step 60 and deleted it at once). `load_model` reads the most recently written
run of a stage unless given one. Checkpoints of the old layout (`<stage>/step_*` directly) still load, as a run
with no name, with a line saying how to give them one.

Atomicity: every rank writes its files into `.tmp_step_000100/`, each file is fsynced, then rank 0 renames the
directory to `step_000100/` and fsyncs the parent. A rename is atomic on POSIX filesystems, so a crash at any point
leaves either the old set of checkpoints or the old set plus the new one; never a half-written `step_*` directory.
Older checkpoints beyond `keep_last` are deleted only after the new one is in place. What a crash can leave behind
(`.tmp_*`, or `.old_step_*` from a re-save of one step) is cleaned at the next save or start of that run: an
`.old_step_N` whose `step_N` is missing was a complete checkpoint, so it is renamed back rather than deleted.
Multi-node runs need a shared filesystem for the checkpoint directory (each rank writes its own shard into the same
folder).

FSDP (`--fsdp`): model.pt is still the full state dict, gathered onto rank 0 (`model_state_for_save`), so it loads
without FSDP; the optimizer files hold each rank's shard of the optimizer state, as in the default mode.

Provenance: meta.json holds the resolved model and run config, git commit + dirty flag, tokenizer hash, world size,
step, wall time and the sizes of every file (a truncated file is detected before torch.load is even tried).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from picochat.common import UserError, autodetect_device, get_base_dir, is_fsdp
from picochat.config import ModelConfig

STAGES = ("base", "mid", "sft", "rl")  # in pipeline order: latest_source() picks the last that exists
_STEP_RE = re.compile(r"^step_(\d{6,})$")
_OLD_RE = re.compile(r"^\.old_(step_\d{6,})_\d+$")  # a step moved aside while the same step is re-saved
_RUN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
OLD_LAYOUT = ""  # the run name of checkpoints saved directly under <stage>/ (before runs had names)


def checkpoint_dir(stage: str, base_dir: str | Path | None = None) -> Path:
    """The stage's folder, holding one folder per run."""
    if stage not in STAGES:
        raise UserError(f"unknown checkpoint source '{stage}'; expected one of {', '.join(STAGES)}")
    return Path(base_dir or get_base_dir()) / "checkpoints" / stage


def run_dir(stage: str, run: str, base_dir: str | Path | None = None) -> Path:
    """The folder of one run's checkpoints: <base>/checkpoints/<stage>/<run>; OLD_LAYOUT names the stage folder."""
    if run == OLD_LAYOUT:
        return checkpoint_dir(stage, base_dir)
    if not _RUN_RE.match(run) or _STEP_RE.match(run):
        raise UserError(f"--run {run!r}: a run name is 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                        f"or digit, and not step_N")
    return checkpoint_dir(stage, base_dir) / run


def list_runs(stage: str, base_dir: str | Path | None = None) -> list[str]:
    """Names of the stage's runs that hold a checkpoint, the most recently written last (OLD_LAYOUT among them when
    step folders sit directly under the stage folder)."""
    d = checkpoint_dir(stage, base_dir)
    if not d.is_dir():
        return []
    runs = [p.name for p in d.iterdir() if _RUN_RE.match(p.name) and not _STEP_RE.match(p.name) and list_steps(p)]
    if list_steps(d):
        runs.append(OLD_LAYOUT)
    return sorted(runs, key=lambda r: _written_at(run_dir(stage, r, base_dir)))


def _written_at(d: Path) -> float:
    """When the newest checkpoint in run folder `d` was saved: its meta's saved_at (copies keep it), else mtime."""
    meta = d / f"step_{list_steps(d)[-1]:06d}" / "meta.json"
    try:
        return float(json.loads(meta.read_text())["saved_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return meta.stat().st_mtime


def clean_leftovers(d: str | Path) -> None:
    """Remove what a crash during a save left in run folder `d` (rank 0 only): `.tmp_*` folders are incomplete saves;
    an `.old_step_N_*` folder is a complete step moved aside for a re-save of step N, so it is put back when step_N
    is missing (the crash came between the two renames) and deleted otherwise."""
    d = Path(d)
    if not d.is_dir():
        return
    for p in d.iterdir():
        old = _OLD_RE.match(p.name)
        if old and not (d / old.group(1)).exists():
            p.rename(d / old.group(1))
        elif old or p.name.startswith(".tmp_step_"):
            shutil.rmtree(p, ignore_errors=True)


def clear_run(d: str | Path) -> None:
    """--overwrite: delete every checkpoint of run folder `d` (rank 0 only), leftovers included."""
    d = Path(d)
    clean_leftovers(d)
    for step in list_steps(d):
        shutil.rmtree(d / f"step_{step:06d}")


def git_info() -> dict:
    """Commit and dirty flag of the source tree, or 'unknown' outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": "unknown", "dirty": None}


def _plain(x):
    return asdict(x) if is_dataclass(x) else dict(x)


def build_meta(model_config: ModelConfig, run_config, tokenizer_hash: str, step: int, world_size: int,
               **extra) -> dict:
    return {"model_config": _plain(model_config), "run_config": _plain(run_config) if run_config else {},
            "tokenizer_hash": tokenizer_hash, "step": step, "world_size": world_size, "git": git_info(),
            "saved_at": time.time(), **extra}


def _fsync_write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def strip_compile_prefix(state: dict) -> dict:
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def model_state_for_save(model: torch.nn.Module, is_master: bool) -> dict | None:
    """The model's full state dict on rank 0 (None on other ranks), the same keys and shapes whether or not the model
    is wrapped with FSDP2, so `load_model` reads either. Collective under FSDP (it all-gathers the shards one tensor
    at a time, onto rank 0's CPU): every rank must call it."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # cpu_offload=True keeps the gathered tensors on rank 0 only, in host memory: a model that does not fit one
        # device is never whole on a device
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if is_master else None
    return model.state_dict() if is_master else None


def save_checkpoint(ckpt_dir: str | Path, step: int, model_state: dict | None, optim_state: dict | None,
                    meta: dict, loader_state: dict | None = None, rank: int = 0, keep_last: int = 2) -> Path:
    """Collective under torch.distributed: every rank calls it with its own optimizer/loader state; rank 0 also
    passes model_state and meta. Returns the final directory."""
    ckpt_dir = Path(ckpt_dir)
    name = f"step_{step:06d}"
    tmp, final = ckpt_dir / f".tmp_{name}", ckpt_dir / name
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        clean_leftovers(ckpt_dir)  # e.g. a .tmp_ folder of this very step from a crash during an earlier save
        tmp.mkdir()
    barrier()
    if optim_state is not None:
        _fsync_write(tmp / f"optim_rank{rank}.pt", lambda f: torch.save(optim_state, f))
    if loader_state is not None:
        _fsync_write(tmp / f"loader_rank{rank}.json", lambda f: f.write(json.dumps(loader_state).encode()))
    barrier()
    if rank == 0:
        _fsync_write(tmp / "model.pt", lambda f: torch.save(strip_compile_prefix(model_state), f))
        meta = {**meta, "step": step, "files": {p.name: p.stat().st_size for p in tmp.iterdir()}}
        _fsync_write(tmp / "meta.json", lambda f: f.write(json.dumps(meta, indent=2, default=str).encode()))
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step: move the old one aside first, delete after the swap
            trash = ckpt_dir / f".old_{name}_{os.getpid()}"
            final.rename(trash)
            tmp.rename(final)
            shutil.rmtree(trash)
        else:
            tmp.rename(final)
        _fsync_dir(ckpt_dir)
        for old in list_steps(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(ckpt_dir / f"step_{old:06d}", ignore_errors=True)
    barrier()
    return final


def list_steps(ckpt_dir: str | Path) -> list[int]:
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _STEP_RE.match(p.name)) and (p / "meta.json").exists())


def _load_file(path: Path, expected_size: int | None, device) -> object:
    if not path.exists():
        raise UserError(f"checkpoint file {path} is missing; the checkpoint is incomplete, delete its folder or pick "
                        f"another --step")
    if expected_size is not None and path.stat().st_size != expected_size:
        raise UserError(f"checkpoint file {path} is {path.stat().st_size} bytes but meta.json says {expected_size}: "
                        f"it is truncated or corrupt; delete its folder or pick another --step")
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt zip/pickle; all mean the same thing here
        raise UserError(f"checkpoint file {path} cannot be read ({type(e).__name__}): it is corrupt; delete its "
                        f"folder or pick another --step") from None


def load_checkpoint(ckpt_dir: str | Path, step: int | None = None, rank: int = 0, device="cpu",
                    load_optim: bool = True) -> dict:
    """Returns {"step", "meta", "model", "optim", "loader"} (optim/loader None when absent or not asked)."""
    ckpt_dir = Path(ckpt_dir)
    steps = list_steps(ckpt_dir)
    if not steps:
        raise UserError(f"no checkpoint in {ckpt_dir}; train that stage first")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(f"no checkpoint for step {step} in {ckpt_dir}; available: {steps}")
    d = ckpt_dir / f"step_{step:06d}"
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint file {d / 'meta.json'} cannot be read ({e}); delete its folder") from None
    sizes = meta.get("files", {})
    out = {"step": step, "meta": meta, "dir": d, "optim": None, "loader": None}
    out["model"] = _load_file(d / "model.pt", sizes.get("model.pt"), device)
    if load_optim and f"optim_rank{rank}.pt" in sizes:
        out["optim"] = _load_file(d / f"optim_rank{rank}.pt", sizes[f"optim_rank{rank}.pt"], device)
    if f"loader_rank{rank}.json" in sizes:
        out["loader"] = _load_file(d / f"loader_rank{rank}.json", sizes[f"loader_rank{rank}.json"], device)
    return out


def check_compatible(meta: dict, model_config: ModelConfig | None, tokenizer_hash: str | None, where: Path) -> None:
    """A clear error when a checkpoint was made with another tokenizer or model shape."""
    if tokenizer_hash is not None and meta.get("tokenizer_hash") != tokenizer_hash:
        raise UserError(f"checkpoint {where} was trained with tokenizer {meta.get('tokenizer_hash')} but the current "
                        f"tokenizer is {tokenizer_hash}; use the tokenizer it was trained with or start a new run")
    if model_config is not None:
        saved, now = meta.get("model_config", {}), asdict(model_config)
        diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        if diff:
            items = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise UserError(f"checkpoint {where} has a different model config ({items}); pass matching flags or "
                            f"start a new run")


def latest_source(base_dir: str | Path | None = None) -> str | None:
    """The most advanced stage that has a checkpoint in any run (rl > sft > mid > base), or None."""
    for stage in reversed(STAGES):
        if list_runs(stage, base_dir):
            return stage
    return None


def pick_run(stage: str, run: str | None = None, base_dir: str | Path | None = None) -> tuple[str, Path]:
    """(run name, folder) to load from: `run` when given, else the stage's most recently written run, said on stderr
    (stdout may be a one-shot reply)."""
    runs = list_runs(stage, base_dir)
    named = ", ".join(sorted(r or "(old layout)" for r in runs)) or "none"
    if run is not None:
        d = run_dir(stage, run, base_dir)
        if not list_steps(d):
            raise UserError(f"no checkpoint in {d}; runs of this stage: {named}")
        return run, d
    if not runs:
        raise UserError(f"no checkpoint in {checkpoint_dir(stage, base_dir)}; train that stage first")
    run, d = runs[-1], run_dir(stage, runs[-1], base_dir)
    if run == OLD_LAYOUT:
        print(f"picochat: loading {d} (old layout: step folders directly under the stage; move them into {d}/<name>/ "
              f"to make them run <name>)", file=sys.stderr, flush=True)
    elif len(runs) > 1:
        print(f"picochat: loading {stage} run '{run}', the most recently written of {named} (pick one with --run)",
              file=sys.stderr, flush=True)
    return run, d


def load_model(source: str = "auto", step: int | None = None, device="cpu", base_dir: str | Path | None = None,
               run: str | None = None):
    """(model in eval mode, tokenizer, meta) for inference and evaluation. source 'auto' = latest_source(); run
    None = the stage's most recently written run. meta gains "source" and "run"."""
    from picochat.model import GPT
    from picochat.tokenizer import get_tokenizer

    if source == "auto":
        source = latest_source(base_dir)
        if source is None:
            raise UserError(f"no trained model under {Path(base_dir or get_base_dir()) / 'checkpoints'}; run "
                            f"`picochat pretrain` first")
    device = autodetect_device(str(device)) if isinstance(device, str) else device
    run, d = pick_run(source, run, base_dir)
    ck = load_checkpoint(d, step, device=device, load_optim=False)
    tok = get_tokenizer(Path(base_dir) / "tokenizer" if base_dir else None)
    check_compatible(ck["meta"], None, tok.hash(), ck["dir"])
    cfg = ModelConfig(**ck["meta"]["model_config"])
    model = GPT(cfg).to(device)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise UserError(f"checkpoint {ck['dir'] / 'model.pt'} does not match its meta.json model config: "
                        f"{str(e).splitlines()[0]}") from None
    model.eval()
    return model, tok, {**ck["meta"], "source": source, "run": run}
