"""Typed configuration: the model shape and one run-config dataclass per stage.

Each field's one-line doc (the `doc` metadata) becomes its `--help` text: `parse_config(Cls, argv)` builds the
argparse parser from the dataclass, so a new field is a new flag with no other edit. No YAML: presets are plain
Python functions that return a dict of overrides (`preset_cpu()`, `preset_d20()` ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields

from picochat.common import UserError, print0


def f(default, doc: str, **kw):
    """A dataclass field with a one-line doc that becomes `--help`."""
    return field(default=default, metadata={"doc": doc, **kw})


# ---------------------------------------------------------------------------------------------------------------------
# the model


@dataclass
class ModelConfig:
    """The GPT's shape. `n_embd` / `n_head` are derived from depth by `derive_model_config` unless given."""

    depth: int = f(4, "number of transformer blocks")
    n_embd: int = f(0, "width; 0 = 64*depth rounded up to a multiple of head_dim")
    head_dim: int = f(64, "dimension of each attention head")
    n_head: int = f(0, "query heads; 0 = n_embd // head_dim")
    n_kv_head: int = f(0, "key/value heads for GQA; 0 = n_head (plain multi-head attention)")
    vocab_size: int = f(8192, "tokenizer vocabulary size (the embedding is padded to a multiple of 64)")
    sequence_len: int = f(512, "context length in tokens")
    logit_softcap: float = f(15.0, "tanh soft cap on the logits (0 = off), computed in fp32")
    rope_base: float = f(10000.0, "rotary embedding base")
    window_pattern: str = f("L", "per-layer attention pattern, repeated: L = full causal, S = sliding window")
    short_window: int = f(0, "sliding window size for S layers; 0 = sequence_len // 4")
    value_embeds: bool = f(False, "add a per-token value embedding to v in every other layer")
    resid_scalars: bool = f(False, "learned per-layer scalars mixing the residual stream with the first embedding")

    def validate(self) -> None:
        if self.depth < 1:
            raise UserError(f"depth must be >= 1, got {self.depth}")
        if self.n_embd % self.head_dim != 0:
            raise UserError(f"n_embd {self.n_embd} must be a multiple of head_dim {self.head_dim}")
        if self.n_head * self.head_dim != self.n_embd:
            raise UserError(f"n_head*head_dim ({self.n_head}*{self.head_dim}) must equal n_embd {self.n_embd}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head != 0:
            raise UserError(f"n_kv_head {self.n_kv_head} must divide n_head {self.n_head}")
        if self.head_dim % 2:
            raise UserError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.window_pattern or set(self.window_pattern) - {"S", "L"}:
            raise UserError(f"window_pattern '{self.window_pattern}' may contain only S and L")

    def layer_window(self, layer: int) -> int:
        """Sliding window for `layer` (0 = full causal). The last layer is always full so every token sees all."""
        ch = self.window_pattern[layer % len(self.window_pattern)]
        if ch == "L" or layer == self.depth - 1:
            return 0
        return self.short_window or max(1, self.sequence_len // 4)


def derive_model_config(cfg: ModelConfig) -> ModelConfig:
    """Fill the 0 = derived fields: width = 64·depth rounded up to head_dim, heads = width / head_dim."""
    c = dataclasses.replace(cfg)
    if c.n_embd == 0:
        c.n_embd = math.ceil(64 * c.depth / c.head_dim) * c.head_dim
    if c.n_head == 0:
        c.n_head = c.n_embd // c.head_dim
    if c.n_kv_head == 0:
        c.n_kv_head = c.n_head
    c.validate()
    return c


# ---------------------------------------------------------------------------------------------------------------------
# argparse from dataclasses


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bool(s: str) -> bool:
    v = s.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got '{s}'")


def int_or_auto(s: str) -> int | str:
    """A count >= 1, or the word auto (the program picks the number): `--device-batch-size auto`."""
    if s.strip().lower() == "auto":
        return "auto"
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got '{s}'") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or auto, got {v}")
    return v


def add_dataclass_args(parser: argparse.ArgumentParser, cls, prefix: str = "", skip: set[str] = frozenset()) -> None:
    hints = typing.get_type_hints(cls)
    for fl in fields(cls):
        if fl.name in skip:
            continue
        typ = hints[fl.name]
        doc = fl.metadata.get("doc", "")
        default = fl.default if fl.default is not dataclasses.MISSING else None
        kw: dict = {"default": argparse.SUPPRESS, "help": f"{doc} (default: {default!r})", "dest": prefix + fl.name}
        origin = typing.get_origin(typ)
        if typ is bool:
            kw.update(type=_bool, nargs="?", const=True, metavar="BOOL")
        elif origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
            inner = [a for a in typing.get_args(typ) if a is not type(None)][0]
            kw.update(type=inner)
        elif typ in (int, float, str):
            kw.update(type=typ)
        if "parse" in fl.metadata:  # a field whose values are not one plain type (int_or_auto)
            kw["type"] = fl.metadata["parse"]
        for k in ("choices", "metavar"):
            if k in fl.metadata:
                kw[k] = fl.metadata[k]
        parser.add_argument(_flag(fl.name), **kw)


def build(cls, values: dict):
    """Instantiate `cls` from a dict, ignoring keys it does not have."""
    names = {fl.name for fl in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def parse_config(cls, argv, prog: str, description: str = "", presets: dict | None = None, extra=None):
    """Parse argv into `cls` (a run config). `presets` maps a name to a function returning overrides; the chosen
    preset is applied first, then explicit flags. `extra(parser)` may add flags that are not config fields.
    Returns (config, explicit_flags_dict, namespace)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=None, help="named preset applied before flags")
    add_dataclass_args(parser, cls)
    if extra:
        extra(parser)
    ns = parser.parse_args(argv)
    explicit = {k: v for k, v in vars(ns).items() if k != "preset"}
    values: dict = {}
    if presets and getattr(ns, "preset", None):
        values.update(presets[ns.preset]())
    values.update(explicit)
    try:
        cfg = build(cls, values)
    except TypeError as e:
        raise UserError(f"{prog}: {e}") from None
    return cfg, explicit, ns


def log_config(cfg, title: str) -> None:
    print0(f"--- {title} ---")
    for fl in fields(cfg):
        print0(f"  {fl.name:24s} = {getattr(cfg, fl.name)!r}")


def inherit(child, parent_values: dict, explicit: dict, inheritable: list[str], source: str = "the parent",
            title: str = "config"):
    """A later stage's config from its parent checkpoint's resolved run config (`parent_values`, its meta's
    "run_config"): every name in `inheritable` takes the parent's value unless `explicit` (the flags and the preset
    the user gave) sets it, where the explicit value wins. Prints one line per inherited and per overridden value,
    naming `source`, and returns the merged config; `child` itself is not changed."""
    names = {fl.name for fl in fields(child)}
    unknown = [n for n in inheritable if n not in names]
    if unknown:  # a typo here would silently inherit nothing
        raise ValueError(f"{type(child).__name__} has no fields {unknown}")
    c = dataclasses.replace(child)
    print0(f"{title}: inheriting from {source}")
    for name in inheritable:
        if name not in parent_values:
            continue
        if name in explicit:
            if parent_values[name] != explicit[name]:
                print0(f"  {title}.{name}: overridden {parent_values[name]!r} -> {explicit[name]!r}")
            continue
        setattr(c, name, parent_values[name])
        print0(f"  {title}.{name}: inherited {parent_values[name]!r}")
    return c


# ---------------------------------------------------------------------------------------------------------------------
# inference commands (chat, serve) pick a checkpoint the same way


@dataclass
class CheckpointSource:
    """Which checkpoint an inference command loads (`checkpoint.load_model(source, step)`) and where it runs."""

    source: str = f("auto", "checkpoint stage: auto (the most advanced one present), base, mid, sft or rl",
                    choices=["auto", "base", "mid", "sft", "rl"])
    run: str = f("", "run under checkpoints/<stage>/ (empty = the most recently written run of that stage)")
    step: int | None = f(None, "checkpoint step (default: the latest of that run)")
    device: str = f("auto", "auto, cpu, cuda, cuda:N or mps")
    compile: bool = f(False, "torch.compile the decode step: a 20-45 s warm-up on 2 cores, then faster decoding "
                             "(d6 fp32 at batch 1: 859-995 vs 230 tok/s, README: Measured); freezes the weights into "
                             "the compiled code")


# ---------------------------------------------------------------------------------------------------------------------
# supervised training (pretrain / midtrain / sft share these; each stage subclasses and adds its own)


@dataclass
class TrainConfig:
    """Knobs of the one supervised loop (picochat/train/loop.py)."""

    device: str = f("auto", "cuda | mps | cpu | auto (CUDA > MPS > CPU)")
    dtype: str = f("auto", "auto (bf16 where the hardware runs it fast) | fp32 | bf16")
    compile: bool = f(False, "torch.compile the model for training (pays off after a few hundred steps)")
    fsdp: bool = f(False, "under torchrun, shard parameters, gradients and optimizer state with FSDP2 (for models "
                          "that do not fit one device; costs more communication)")
    seed: int = f(0, "random seed (weights init, sampling)")
    deterministic: bool = f(False, "bit-identical losses for the same seed on the same hardware: deterministic "
                                   "kernels only, cuBLAS workspace pinned (slower; README: Measured)")
    device_batch_size: int = f(16, "sequences per micro-batch per device")
    total_batch_size: int = f(16384, "tokens per optimizer step across all ranks (gradient accumulation fills it)")
    num_steps: int = f(-1, "optimizer steps; -1 = derived by the stage (data ratio, or one pass over the data)")
    max_minutes: float = f(0.0, "wall-clock budget in minutes (0 = none); the LR schedule compresses so the "
                                "warmdown still happens")
    warmup_steps: int = f(10, "linear LR warmup steps")
    warmdown_ratio: float = f(0.3, "fraction of training spent decaying the LR to final_lr_frac")
    final_lr_frac: float = f(0.0, "LR at the end, as a fraction of the peak")
    schedule: str = f("trapezoid", "LR shape: trapezoid (warmup, constant, linear warmdown) or cosine",
                      choices=["trapezoid", "cosine"])
    matrix_lr: float = f(0.02, "Muon LR for the 2-D matrices in the blocks")
    embedding_lr: float = f(0.2, "AdamW LR for the token embedding (at width 768; scaled by (C/768)^-0.5)")
    unembedding_lr: float = f(0.004, "AdamW LR for lm_head (at width 768; scaled by (C/768)^-0.5)")
    scalar_lr: float = f(0.5, "AdamW LR for per-layer scalars (at width 768; scaled by (C/768)^-0.5)")
    weight_decay: float = f(0.0, "decoupled weight decay on 2-D parameters")
    grad_clip: float = f(1.0, "clip the global gradient norm to this (0 = off)")
    eval_every: int = f(100, "evaluate validation bits-per-byte every N steps (and at the end; 0 = only the end)")
    eval_tokens: int = f(65536, "validation tokens per evaluation")
    sample_every: int = f(0, "print samples from fixed prompts every N steps (0 = only at the end, -1 = never)")
    save_every: int = f(0, "checkpoint every N steps (and always at the end; 0 = only the end)")
    keep_last: int = f(2, "checkpoints to keep")
    resume: bool = f(False, "continue from the latest checkpoint of this run (--run)")
    stop_at: int = f(0, "stop (with a checkpoint) after this step, schedule unchanged: split a run into sessions")
    run: str = f("", "run name: checkpoints go to checkpoints/<stage>/<run>/ (empty = d<depth> for pretraining); "
                     "also the wandb run's name")
    overwrite: bool = f(False, "start a fresh run even where this run's folder holds checkpoints: delete them first")
    wandb: bool = f(False, "log metrics to wandb (needs `pip install wandb` and a login)")
    metrics: str = f("", "JSONL metrics path; empty = <base>/logs/<stage>/<run>.jsonl")
    corpus: str = f("default", "corpus name under <base>/corpus (see `picochat data`)")


@dataclass
class PretrainConfig(TrainConfig):
    """`picochat pretrain`: model shape + the loop's knobs; the step count derives from a tokens:params ratio."""

    depth: int = f(4, "transformer blocks; width = 64*depth (rounded to head_dim) unless --n-embd")
    n_embd: int = f(0, "model width (0 = derived from depth)")
    head_dim: int = f(64, "attention head dimension")
    n_kv_head: int = f(0, "key/value heads for GQA (0 = same as query heads)")
    max_seq_len: int = f(256, "context length / training sequence length")
    window_pattern: str = f("L", "attention pattern per layer, repeated: L full, S sliding window (e.g. SSSL)")
    value_embeds: bool = f(False, "value embeddings in every other layer (see README: measured effect)")
    resid_scalars: bool = f(False, "per-layer residual/x0 scalars (see README: measured effect)")
    target_param_data_ratio: float = f(20.0, "training tokens per parameter (Chinchilla ~20) when num_steps is -1")
    max_epochs: float = f(0.0, "stop after this many passes over the training documents (0 = no limit); the LR "
                               "schedule compresses so the warmdown still happens")
    packing: str = f("auto", "how rows are packed: split (a document's rest continues as a BOS-led piece: every "
                             "token is used) | crop (nanochat's: rests are dropped, every token sees its document's "
                             "start) | auto (crop while the run reads each document at most once, else split; "
                             "README: Measured)", choices=["auto", "split", "crop"])
    core_every: int = f(0, "also evaluate CORE every N steps, at the evaluations that fall on a multiple (0 = off; "
                           "CORE-20 offline unless the full bundle is downloaded: `picochat eval base --core-bundle "
                           "full`)")
    core_max_per_task: int = f(100, "examples per CORE task in a training-time evaluation")
    core_bundle: str = f("auto", "CORE bundle for --core-every: auto, full, core20 or a bundle folder")
    allow_epochs: float = f(20.0, "refuse to start when the planned tokens exceed this many passes over the "
                                  "training corpus (a warning above 4)")
    # pretraining alone takes auto: a chat stage inherits its parent's resolved number (its meta's run_config)
    device_batch_size: int | str = f(16, "sequences per micro-batch per device, or auto: on CUDA the largest that fits "
                                         "a forward + backward probe, from --auto-batch-start doubled (up to one "
                                         "micro-batch per step) then halved; elsewhere --auto-batch-start",
                                     parse=int_or_auto, metavar="N|auto")
    auto_batch_start: int = f(16, "--device-batch-size auto: the size it starts from (and uses as is on CPU and MPS, "
                                  "or under --fsdp)")


def preset_cpu() -> dict:
    """The 2-core demo's pretraining: ~9 minutes on a Zen 5 at ~6,000 tokens/s in bf16, 10 at most (the schedule
    compresses to the cap on a slower CPU)."""
    # num_steps=400: 3.3M tokens, 0.81 passes over the speedrun's 'demo' corpus (Austen + the chat sources' train
    # rows, 4.0M training tokens), so --packing auto picks split (crop would keep ~26% of a pass at T = 256). On the
    # old Shakespeare + KJV corpus (2.15M tokens) 260 steps ended at validation bpb 1.582 with split and 1.771 with
    # crop (README: Measured); the old --max-epochs 4 cap was the workaround for crop's repetition.
    return dict(depth=4, head_dim=64, max_seq_len=256, device_batch_size=16, total_batch_size=8192, num_steps=400,
                warmup_steps=10, eval_every=50, eval_tokens=32768, save_every=100, max_minutes=10.0)


def preset_d12() -> dict:
    # auto: the largest micro-batch the card holds (a probe from 32 rows, the size these presets fixed before)
    return dict(depth=12, head_dim=128, max_seq_len=2048, device_batch_size="auto", auto_batch_start=32,
                total_batch_size=524288, target_param_data_ratio=10.0, eval_every=250, eval_tokens=10 * 524288,
                save_every=1000, compile=True)


def preset_d20() -> dict:
    """The speedrun-size model for 8 GPUs: 414M parameters with tok-train's default 8,192-token vocabulary, 561M with
    nanochat's 65,536 (`picochat tok-train --vocab-size 65536`; the vocabulary sets wte and lm_head, 1280 x V each)."""
    return {**preset_d12(), "depth": 20}


def preset_d26() -> dict:
    return {**preset_d12(), "depth": 26, "auto_batch_start": 16}


PRETRAIN_PRESETS = {"cpu": preset_cpu, "d12": preset_d12, "d20": preset_d20, "d26": preset_d26}


# ---------------------------------------------------------------------------------------------------------------------
# the chat stages: midtraining (base -> mid) and SFT (mid or base -> sft) share one config; their defaults differ


@dataclass
class ChatStageConfig(TrainConfig):
    """`picochat midtrain` / `picochat sft`: the model shape comes from the parent checkpoint, the hyperparameters in
    CHAT_INHERITABLE are inherited from its meta unless given (printed either way), and --num-steps -1 means one pass
    over the mixture (--num-epochs)."""

    parent_run: str = f("", "run of the parent stage to start from (empty = its most recently written run)")
    parent_step: int | None = f(None, "step of the parent checkpoint (default: the latest of that run)")
    init_lr_frac: float = f(1.0, "the LRs inherited from the parent are multiplied by this (an explicit --matrix-lr "
                                 "etc. is used as given)")
    max_seq_len: int = f(0, "training sequence length (inherited; 0 = the model's context length)")
    num_epochs: float = f(1.0, "passes over the training mixture when --num-steps is -1")
    scale: float = f(1.0, "multiplies the size of every component of the default mixture")
    data: str = f("", "a JSONL of your own conversations ({\"messages\": [...]} per line) added to the mixture")
    source: str = f("auto", "where task data is read from: auto (a downloaded hub copy, else the offline packages), "
                            "hub (download) or offline", choices=["auto", "hub", "offline"])
    tasks: str = f("", "train on these tasks instead of the default mixture: name[:N],... (names of picochat.tasks; N "
                       "= size of a generated task, or the first N rows of a dataset), e.g. identity,spellingbee:2000")
    packing: str = f("pad", "conversation rows: pad (a conversation that does not fit the row's rest starts the next "
                            "row) | split (fill the row; the rest continues, BOS-led, in another)",
                     choices=["pad", "split"])
    val_conversations: int = f(256, "held-out conversations for the validation loss and bpb")
    mc_eval: str = f("arc-easy:test", "multiple-choice task[:split] for the quick categorical accuracy ('' = off); "
                                      "ARC test is in no training mixture (its validation split is)")
    mc_eval_n: int = f(100, "questions of --mc-eval scored at each evaluation")
    eval_every: int = f(50, "evaluate every N steps (and at the end; 0 = only the end)")
    warmup_steps: int = f(0, "linear LR warmup steps (the parent is trained: none needed)")


@dataclass
class MidtrainConfig(ChatStageConfig):
    """`picochat midtrain`: base -> mid, at the parent's LRs, warmdown over the last 20% (as nanochat's)."""

    warmdown_ratio: float = f(0.2, "fraction of training spent decaying the LR to final_lr_frac")


@dataclass
class SFTConfig(ChatStageConfig):
    """`picochat sft`: mid (or base) -> sft at 2% of the parent's LRs, decaying linearly to 0 (as nanochat's)."""

    init_lr_frac: float = f(0.02, "the LRs inherited from the parent are multiplied by this (an explicit "
                                  "--matrix-lr etc. is used as given)")
    warmdown_ratio: float = f(1.0, "fraction of training spent decaying the LR to final_lr_frac (1 = linear decay "
                                   "from the first step)")


# what a chat stage takes from its parent's run config unless given; the model shape always comes from the parent
CHAT_INHERITABLE = ["dtype", "compile", "fsdp", "device_batch_size", "total_batch_size", "max_seq_len", "matrix_lr",
                    "embedding_lr", "unembedding_lr", "scalar_lr", "weight_decay", "grad_clip"]


def preset_mid_cpu() -> dict:
    """The README's 2-core demo after `pretrain --preset cpu` (whose batch geometry is inherited: 8,192-token steps
    of T = 256): one pass over the offline mixture at 8% of its full size."""
    # scale 0.08: 4,184 conversations rendered to ~780k tokens (scale 0.05 measured 484k), so ~100 steps, about 3
    # minutes at the pretraining preset's ~5,000 tokens/s on 2 cores (README: Measured)
    return dict(scale=0.08, eval_every=25, val_conversations=128, mc_eval_n=100, max_minutes=6.0)


def preset_sft_cpu() -> dict:
    """The 2-core demo after `midtrain --preset cpu`: one pass over the SFT mixture at 30% of its full size, at 10%
    of the parent's LRs (not nanochat's 2%: a 7M-parameter model after ~85 midtraining steps still has much to learn
    from the cleaner SFT data)."""
    # scale 0.3: ~3,700 conversations, ~550k tokens, so ~67 steps at the inherited 8,192 tokens per step. From the
    # same mid checkpoint, 67 steps: validation bpb 1.193 at --init-lr-frac 0.02 and 1.166 at 0.1 (README: Measured)
    return dict(scale=0.3, init_lr_frac=0.1, eval_every=25, val_conversations=128, mc_eval_n=100, max_minutes=6.0)


MIDTRAIN_PRESETS = {"cpu": preset_mid_cpu}
SFT_PRESETS = {"cpu": preset_sft_cpu}
