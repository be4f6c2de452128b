"""`picochat export --format hf`: a checkpoint as a Hugging Face `transformers` model folder.

    picochat export --format hf --out exported/                       # the most advanced stage's latest checkpoint
    picochat export --format hf --source base --run d4 --step 200 --out exported-base/

The folder holds model.safetensors (fp32; wte and lm_head untied, sliced back from the padded vocabulary to the real
one), config.json (model_type "picochat", every ModelConfig field, bos/eos/pad ids, auto_map to the two files below,
and where the weights came from), configuration_picochat.py and modeling_picochat.py (copied from picochat/hf/;
loaded with trust_remote_code=True), generation_config.json, and the tokenizer: tokenizer.json in the `tokenizers`
library's format, built from picochat's ranks (`hf_tokenizer`: byte-level BPE, the same split regex, every merge
tiktoken could make), tokenizer_config.json with the special tokens and a Jinja chat template that renders what
`Tokenizer.render_for_completion` does. Needs the `export` extra (`pip install 'picochat[export]'`): safetensors
and tokenizers to write it, transformers to load it.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from picochat.checkpoint import load_model
from picochat.common import UserError, print0, run_main
from picochat.config import f, parse_config
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer

if TYPE_CHECKING:  # the export extra's; imported where used, so `picochat export --help` works without it
    import tokenizers

HF_DIR = Path(__file__).parent / "hf"  # the remote-code files, copied into every export
REMOTE_CODE = ("configuration_picochat.py", "modeling_picochat.py")

# <|bos|> then each turn as Tokenizer._render writes it: a system message is prepended to the first user message with
# a blank line; assistant content is a string or a list of text / python / python_output parts (the tool's wrappers).
# With add_generation_prompt a final assistant message is dropped, as render_for_completion drops it.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] + '\\n\\n' -%}"
    "{%- elif m['role'] == 'user' -%}<|user_start|>{{ ns.system + m['content'] }}<|user_end|>"
    "{%- set ns.system = '' -%}"
    "{%- elif not (add_generation_prompt and loop.last) -%}<|assistant_start|>"
    "{%- if m['content'] is string -%}{{ m['content'] }}"
    "{%- else -%}{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'python' -%}<|python_start|>{{ p['text'] }}<|python_end|>"
    "{%- elif p['type'] == 'python_output' -%}<|output_start|>{{ p['text'] }}<|output_end|>"
    "{%- else -%}{{ p['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


@dataclass
class ExportConfig:
    """`picochat export`: which checkpoint, which format, where to."""

    out: str = f("", "output folder (created; an earlier picochat export there is replaced)")
    format: str = f("hf", "hf: safetensors + config + remote-code modeling file + tokenizer for transformers",
                    choices=["hf"])
    source: str = f("auto", "checkpoint stage: auto (the most advanced one present), base, mid, sft or rl",
                    choices=["auto", "base", "mid", "sft", "rl"])
    run: str = f("", "run under checkpoints/<stage>/ (empty = the most recently written run of that stage)")
    step: int | None = f(None, "checkpoint step (default: the latest of that run)")


def _byte_chars() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table, which `tokenizers`' ByteLevel uses): the 188
    printable Latin-1 bytes stand for themselves, the other 68 map to U+0100 onwards in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in keep}
    for i, b in enumerate(b for b in range(256) if b not in out):
        out[b] = chr(256 + i)
    return out


def onig_pattern(pattern: str) -> str:
    """The split regex for `tokenizers` (Oniguruma, Ruby syntax), where `x{1,2}+` is not a possessive interval as in
    tiktoken's fancy-regex but `(x{1,2})+`, any run of digits ("212۲" became one piece, 8 of 2,000 random strings
    tokenized differently). At the end of an alternative, as here, a greedy interval matches what the possessive one
    does: nothing after it can make it give a character back. `?+`, `*+` and `++` are possessive in both."""
    return re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pattern)


def hf_tokenizer(tok: Tokenizer) -> tokenizers.Tokenizer:
    """picochat's tokenizer as a `tokenizers.Tokenizer` that gives the same ids for any text without special-token
    strings: the split regex as a pre-tokenizer, then byte-level BPE over the same vocabulary. tiktoken merges any
    adjacent pair whose concatenation is a token, lowest rank first, leftmost on ties; so every split of every token
    into two tokens is a merge here, ranked by the merged token (ties: the shorter left part first), and a piece that
    is a token as a whole is taken as one (ignore_merges), as tiktoken does. Specials are added tokens at their ids;
    encoding with special tokens on (the default) prepends <|bos|>, as picochat's documents start."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    spec = tok._canonical()  # the pattern, ranks (base64, in rank order) and special tokens the file stores
    ranks = [base64.b64decode(s) for s in spec["ranks"]]
    rank_of = {b: i for i, b in enumerate(ranks)}
    chars = _byte_chars()
    text = ["".join(chars[c] for c in b) for b in ranks]
    merges = sorted((rank, k, text[rank_of[b[:k]]], text[rank_of[b[k:]]])
                    for rank, b in enumerate(ranks) for k in range(1, len(b)) if b[:k] in rank_of and b[k:] in rank_of)
    bpe = models.BPE(vocab={t: i for i, t in enumerate(text)}, merges=[(a, b) for _, _, a, b in merges],
                     ignore_merges=True)
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(onig_pattern(spec["pattern"])), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    specials = spec["special_tokens"]
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    for s in specials:  # added tokens take the next free ids: check they landed on picochat's
        if hf.token_to_id(s) != tok.special_id(s):
            raise RuntimeError(f"special token {s} got id {hf.token_to_id(s)}, picochat has {tok.special_id(s)}")
    hf.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                      special_tokens=[("<|bos|>", tok.bos_id)])
    return hf


def export_hf(model, tok: Tokenizer, meta: dict, out: str | Path) -> Path:
    """Write the model folder (see the module docstring) and return its path."""
    try:
        import tokenizers  # noqa: F401  (hf_tokenizer's)
        from safetensors.torch import save_file
    except ImportError:
        raise UserError("picochat export needs safetensors and tokenizers: pip install 'picochat[export]'") from None
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        try:
            ours = json.loads((out / "config.json").read_text()).get("model_type") == "picochat"
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise UserError(f"--out {out} is not empty and holds no earlier picochat export; pick an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    V = cfg.vocab_size
    # the padded rows (the vocabulary is padded to a multiple of 64 for the matmuls) are never read: ids are < V
    state = {k: (v[:V] if k in ("wte.weight", "lm_head.weight") or k.startswith("value_embeds.") else v)
             for k, v in model.state_dict().items()}
    save_file({k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors writes it 0600; the other files are 0644
    bos, end = tok.bos_id, tok.special_id("<|assistant_end|>")
    config = {
        "architectures": ["PicochatForCausalLM"], "model_type": "picochat",
        "auto_map": {"AutoConfig": "configuration_picochat.PicochatConfig",
                     "AutoModelForCausalLM": "modeling_picochat.PicochatForCausalLM"},
        **asdict(cfg),
        # a chat model ends its turn with <|assistant_end|>; a base model's documents end where the next <|bos|> is
        "bos_token_id": bos, "eos_token_id": end, "pad_token_id": bos, "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "picochat": {"source": meta.get("source"), "run": meta.get("run"), "step": meta.get("step"),
                     "tokenizer_hash": meta.get("tokenizer_hash"), "git": meta.get("git")},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos, "eos_token_id": [end, bos], "pad_token_id": bos}, indent=2) + "\n")
    for name in REMOTE_CODE:
        shutil.copyfile(HF_DIR / name, out / name)
    hf_tokenizer(tok).save(str(out / "tokenizer.json"))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>",
                  "pad_token": "<|bos|>", "additional_special_tokens": [s for s in SPECIAL_TOKENS if s != "<|bos|>"],
                  "model_max_length": cfg.sequence_len, "clean_up_tokenization_spaces": False,
                  # no token_type_ids: transformers 4.x's fast tokenizer returns them unless told, and generate()
                  # then refuses them as unused model kwargs
                  "model_input_names": ["input_ids", "attention_mask"],
                  "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    return out


def run(argv=None) -> Path:
    cfg, _, _ = parse_config(ExportConfig, argv, prog="picochat export", description=__doc__.split("\n")[0])
    if not cfg.out:
        raise UserError("picochat export: --out DIR is required (the folder to write the model to)")
    model, tok, meta = load_model(cfg.source, cfg.step, "cpu", run=cfg.run or None)
    out = export_hf(model, tok, meta, cfg.out)
    print0(f"exported {meta['source']} run '{meta['run']}' step {meta['step']} to {out}")
    print0(f"load it: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return out


def main(argv=None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
