"""`picochat pretrain`: train the base model on a packed text corpus.

    picochat pretrain --preset cpu                       # ~10 minutes on a laptop CPU (needs `picochat data prepare`
                                                         #   and `picochat tok-train` first)
    picochat pretrain --depth 6 --num-steps 200 --resume # continue run d6 (checkpoints/base/d6/)
    torchrun --nproc_per_node=8 -m picochat.train.pretrain --preset d20     # one node, 8 GPUs
    torchrun --nproc_per_node=8 -m picochat.train.pretrain --depth 32 --fsdp  # shard the model too (FSDP2)
    runs/multinode.sh                                                       # several nodes

--depth derives the width, heads and (with --target-param-data-ratio) the number of steps; learning rates scale
with width inside the optimizer. Every resolved value is printed before training starts, and so is the run's
expected wall time and cost (its FLOPs at an assumed MFU). --device-batch-size auto (the GPU presets' default)
takes the largest micro-batch that fits the card (train/autobatch.py) and records the number in the checkpoints.
"""

from __future__ import annotations

import dataclasses

import torch

from picochat.common import Runtime, UserError, autocast_ctx, measure_matmul_flops, print0, run_main, runtime
from picochat.config import PRETRAIN_PRESETS, ModelConfig, PretrainConfig, derive_model_config, log_config, \
    parse_config
from picochat.data.loader import PackingLoader, ValidationSlice, corpus_tokens
from picochat.evals.bpb import evaluate_bpb
from picochat.model import GPT
from picochat.tokenizer import get_tokenizer
from picochat.train.autobatch import describe_expected, resolve_device_batch_size
from picochat.train.loop import Stage, micro_batches, prepare, text_samples, train


def model_config_for(cfg: PretrainConfig, vocab_size: int) -> ModelConfig:
    return derive_model_config(ModelConfig(depth=cfg.depth, n_embd=cfg.n_embd, head_dim=cfg.head_dim,
                                           n_kv_head=cfg.n_kv_head, vocab_size=vocab_size,
                                           sequence_len=cfg.max_seq_len, window_pattern=cfg.window_pattern,
                                           value_embeds=cfg.value_embeds, resid_scalars=cfg.resid_scalars))


def resolve(cfg: PretrainConfig, model: GPT, rt: Runtime) -> tuple[int, int]:
    """(num_steps, grad_accum) from the batch geometry and the tokens:params ratio."""
    accum = micro_batches(cfg, cfg.max_seq_len, rt.world_size)
    if cfg.num_steps > 0:
        return cfg.num_steps, accum
    n = model.num_params()
    n_train = n["total"] - n["wte"]  # the embedding is a lookup, not compute: leave it out of the ratio
    steps = max(1, round(cfg.target_param_data_ratio * n_train / cfg.total_batch_size))
    print0(f"num_steps = {cfg.target_param_data_ratio:g} tokens/param x {n_train:,} params / "
           f"{cfg.total_batch_size:,} tokens per step = {steps:,}")
    return steps, accum


# Passes over the corpus above which a run is probably mis-planned: a warning at WARN_EPOCHS, a refusal at
# --allow-epochs. 4: repeating data up to ~4 times costs little (Muennighoff et al. 2023, "Scaling Data-Constrained
# Language Models"); the CPU preset's 4 passes of the crop loader still lowered validation bpb at every eval.
WARN_EPOCHS = 4.0


def plan_epochs(cfg: PretrainConfig, tok, num_steps: int) -> tuple[float, str]:
    """Planned passes over the training corpus and the packing policy; warns above WARN_EPOCHS and refuses above
    --allow-epochs with one line. Epochs here are planned tokens / corpus tokens (--max-epochs caps them): crop
    reads the documents more often than that, as it keeps only part of the longer ones.
    packing=auto: crop while it would read each document at most once (planned tokens <= the share of a pass crop
    keeps), split beyond: at equal steps crop was ahead while its data was fresh and fell behind once it repeated
    (README: Measured)."""
    planned = num_steps * cfg.total_batch_size
    size = corpus_tokens(tok, "train", cfg.corpus, row=cfg.max_seq_len + 1)
    epochs = planned / max(1, size.tokens)
    if cfg.max_epochs > 0:
        epochs = min(epochs, cfg.max_epochs)
    packing = cfg.packing if cfg.packing != "auto" else ("crop" if epochs <= size.crop_frac else "split")
    print0(f"data plan: {planned:,} tokens = {epochs:.2f} epochs of corpus '{cfg.corpus}' ({size.tokens:,} training "
           f"tokens, {size.how}; crop keeps at most {size.crop_frac:.0%} of a pass); packing {packing}"
           + (" (auto)" if cfg.packing == "auto" else ""))
    if epochs > cfg.allow_epochs:
        raise UserError(f"the run plans {epochs:.1f} passes over corpus '{cfg.corpus}' ({size.tokens:,} tokens), more "
                        f"than --allow-epochs {cfg.allow_epochs:g}: add data (`picochat data download --num-shards "
                        f"N`), train fewer steps, or raise --allow-epochs")
    if epochs > WARN_EPOCHS:
        print0(f"warning: {epochs:.1f} passes over the training corpus; beyond ~{WARN_EPOCHS:g} repeated data adds "
               f"little (more data: `picochat data download --num-shards N`)")
    return epochs, packing


def expected(cfg: PretrainConfig, model: GPT, rt: Runtime, steps: int) -> str:
    """The expected wall time and cost of `steps` more steps, from the FLOPs per token and the device's peak."""
    # the loop's own call, arguments as it passes them: the probe is cached per process, so it runs once
    peak = measure_matmul_flops("bfloat16" if rt.dtype == torch.bfloat16 else "float32", rt.device.type)
    gpu = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else None
    line = describe_expected(model.estimate_flops()["total"], steps * cfg.total_batch_size, peak, rt.world_size,
                             rt.device.type, gpu)
    return line + (f" (--max-minutes {cfg.max_minutes:g} may end it sooner)" if cfg.max_minutes > 0 else "")


def run(argv=None) -> dict:
    cfg, _, _ = parse_config(PretrainConfig, argv, prog="picochat pretrain", description=__doc__.split("\n")[0],
                             presets=PRETRAIN_PRESETS)
    with runtime(cfg.device, cfg.dtype, cfg.seed, deterministic=cfg.deterministic) as rt:
        tok = get_tokenizer()
        mcfg = model_config_for(cfg, tok.vocab_size)
        run = cfg.run or f"d{mcfg.depth}"  # checkpoints/base/<run>/: the depth tag unless --run names it
        prep = prepare("base", run, cfg, rt, mcfg, tok)
        model, ck = prep.model, prep.checkpoint
        # auto -> a number before anything sizes by it (accumulation, loaders); the number, not "auto", goes into
        # every checkpoint's run config, which --resume and the chat stages read
        auto = cfg.device_batch_size == "auto"
        B = resolve_device_batch_size(cfg, model, cfg.max_seq_len, rt.world_size, rt.device,
                                      lambda: autocast_ctx(rt.device, rt.dtype), ck)
        cfg = dataclasses.replace(cfg, device_batch_size=B)
        num_steps, accum = resolve(cfg, model, rt)
        _, packing = plan_epochs(cfg, tok, num_steps)
        log_config(cfg, "pretrain config")
        log_config(mcfg, "model config")
        params = model.num_params()
        print0(f"parameters: {params['total']:,} ({', '.join(f'{k} {v:,}' for k, v in params.items() if k != 'total')})"
               f"; FLOPs/token {model.estimate_flops()['total']:.3g}")
        print0(expected(cfg, model, rt, max(0, num_steps - prep.start_step)))
        T = cfg.max_seq_len
        train_loader = PackingLoader(tok, "train", B, T, corpus=cfg.corpus, rank=rt.rank, world_size=rt.world_size,
                                     device=rt.device, packing=packing, state=ck["loader"] if ck else None)
        token_bytes = tok.token_bytes().to(rt.device)
        val = ValidationSlice(tok, B, T, cfg.eval_tokens, corpus=cfg.corpus, rank=rt.rank, world_size=rt.world_size)
        print0(val.describe())

        def evaluate(step: int) -> dict:
            # the same in-order slice every time; the loader's figures are rank 0's (ranks read disjoint row groups)
            batches = val.batches(rt.device)
            out = {"val_bpb": evaluate_bpb(model, lambda: next(batches), val.steps, token_bytes,
                                           autocast=lambda: autocast_ctx(rt.device, rt.dtype)),
                   **train_loader.stats()}
            if cfg.core_every > 0 and step > 0 and step % cfg.core_every == 0:  # every rank scores its share
                from picochat.evals.core import core_eval

                out.update(core_eval(model, tok, rt.device, max_per_task=cfg.core_max_per_task,
                                     bundle=cfg.core_bundle,
                                     autocast=lambda: autocast_ctx(rt.device, rt.dtype))["metrics"])
            return out

        it = iter(train_loader)
        # --max-epochs: the share of the allowed passes already read is one more schedule unit
        data_progress = (lambda step: train_loader.epochs_done() / cfg.max_epochs) if cfg.max_epochs > 0 else None
        stage = Stage(name="base", run=run, cfg=cfg, next_batch=lambda: next(it), progress=data_progress,
                      num_steps=num_steps, grad_accum=accum, loader_state=train_loader.state_dict,
                      evaluate=evaluate, samples=text_samples(),
                      meta={"auto_batch": {"start": cfg.auto_batch_start, "chosen": B}} if auto else {})
        try:
            return train(stage, prep, rt)
        finally:
            train_loader.close()


def main(argv=None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
