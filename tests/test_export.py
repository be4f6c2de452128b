"""`picochat export --format hf`: the exported folder loads with transformers' Auto classes (trust_remote_code), gives
picochat's logits (max abs difference <= 1e-4 in fp32) for every architecture option, greedy `generate` (with its
cache, and left-padded batches) gives picochat's tokens, the tokenizer gives picochat's ids and its chat template
picochat's rendering, and the command writes every ModelConfig field and refuses a folder that is not an export."""

import json
import random
from dataclasses import fields

import pytest
import torch

pytest.importorskip("transformers", reason="the export extra is not installed: pip install 'picochat[export]'")
pytest.importorskip("safetensors", reason="the export extra is not installed: pip install 'picochat[export]'")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from conftest import TINY_TEXT, make_tiny_model, randomize_outputs  # noqa: E402
from picochat.config import ModelConfig  # noqa: E402
from picochat.export import export_hf  # noqa: E402

# one tiny model per architecture option (model.py): T = 64 > the short window 8, so the S layers' band matters
OPTIONS = {
    "plain": {},
    "gqa_sliding_window": dict(n_kv_head=1, window_pattern="SSL", short_window=8, depth=3),
    "value_embeds_resid_scalars": dict(value_embeds=True, resid_scalars=True, depth=3),
    "no_softcap": dict(logit_softcap=0.0),
}


def exported(tok, tmp_path, **options):
    """(picochat model, transformers model) of the same random-weight tiny model, exported to tmp_path/hf."""
    model = randomize_outputs(make_tiny_model(tok.vocab_size, **options))
    if model.config.resid_scalars:  # trained-looking scalars: the defaults 1 and 0 would hide a missing term
        with torch.no_grad():
            model.resid_lambdas.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
            model.x0_lambdas.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(2))
    model.eval()
    out = export_hf(model, tok, {"source": "base", "run": "t", "step": 1}, tmp_path / "hf")
    return model, AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()


@pytest.mark.parametrize("option", list(OPTIONS))
def test_exported_logits_and_loss_match_picochat(tiny_tokenizer, tmp_path, option):
    model, hf = exported(tiny_tokenizer, tmp_path, **OPTIONS[option])
    ids = torch.randint(0, tiny_tokenizer.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids)
        loss = model(ids[:, :-1], targets=ids[:, 1:])
        hf_loss = hf(ids, labels=ids).loss  # transformers shifts the labels inside the model
    assert theirs.logits.dtype == torch.float32 and theirs.logits.shape == ours.shape
    assert (theirs.logits - ours).abs().max().item() <= 1e-4
    assert ours.std() > 0.1  # the model's output depends on the input (a constant one would pass anything)
    assert hf_loss.item() == pytest.approx(loss.item(), abs=1e-4)


def greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens from picochat's model, one full forward per token (the reference, no cache)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0, len(ids):].tolist()


def test_exported_generate_matches_picochat_greedy(tiny_tokenizer, tmp_path):
    """generate() with its KV cache over sliding-window and GQA layers, and a left-padded batch of two prompts of
    different lengths (attention_mask + positions from it), give picochat's greedy tokens."""
    model, hf = exported(tiny_tokenizer, tmp_path, **OPTIONS["gqa_sliding_window"])
    prompts = [tiny_tokenizer.encode(t, prepend=tiny_tokenizer.bos_id) for t in ("To be, or not", "The quick brown fox")]
    n = 20  # past the window of 8: cached keys beyond it must be masked out
    want = [greedy(model, p, n) for p in prompts]
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    lengths = []  # tokens fed per forward: the prompt once, then one token per step (the cache holds the rest)
    hf.register_forward_pre_hook(lambda mod, args, kwargs: lengths.append(kwargs["input_ids"].size(1)),
                                 with_kwargs=True)
    with torch.no_grad():
        alone = [hf.generate(torch.tensor([p]), **kw)[0, len(p):].tolist() for p in prompts]
        assert lengths == [len(prompts[0])] + [1] * (n - 1) + [len(prompts[1])] + [1] * (n - 1)
        L = max(map(len, prompts))
        padded = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
        batch = hf.generate(padded, attention_mask=mask, **kw)[:, L:].tolist()
    assert alone == want
    assert batch == want


SAMPLES = [
    TINY_TEXT[:500],
    "Hello  world\n\n\n  indented\tand tabbed   \n",
    "it's THEY'LL we've I'd don't 'quoted' ''",
    "1234567 3.14159 x1y22z333 ۱۲۳ ½",
    "café naïve Ünïcödé 日本語のテキスト 한국어 \U0001f600\U0001f680 \u200b zero width",
    "def add(a, b):\n    return a + b  # trailing   ",
    "<|bos|> typed by a user is text <|user_start|>",
    "   ",
    "",
]


def test_exported_tokenizer_gives_picochat_ids_and_chat_rendering(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    export_hf(make_tiny_model(tok.vocab_size), tok, {}, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    rng = random.Random(0)
    # plus random strings over the characters of the samples (spaces, digits, quotes, newlines, multibyte)
    alphabet = sorted(set("".join(SAMPLES)))
    texts = SAMPLES + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(200)]
    for text in texts[:6] + texts[8:]:  # sample 6 holds special-token strings: transformers parses those as specials
        assert hf(text, add_special_tokens=False).input_ids == tok.encode(text), text
        assert hf(text).input_ids == tok.encode(text, prepend=tok.bos_id)  # documents start with <|bos|>
        assert hf.decode(tok.encode(text)) == text
    assert hf.bos_token_id == tok.bos_id and hf.eos_token_id == tok.special_id("<|assistant_end|>")
    assert set(hf("x")) == {"input_ids", "attention_mask"}  # token_type_ids would make generate(**inputs) refuse

    conv = {"messages": [
        {"role": "system", "content": "You are picochat."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me compute: "},
                                          {"type": "python", "text": "2+2"},
                                          {"type": "python_output", "text": "4"},
                                          {"type": "text", "text": "It is 4."}]},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6."},
    ]}
    prompt = hf.apply_chat_template(conv["messages"], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert prompt == tok.render_for_completion(conv)  # the final assistant turn is dropped by both
    full = hf.apply_chat_template(conv["messages"], tokenize=True, return_dict=False)
    assert full == tok.render_conversation(conv)[0]


def test_export_command_writes_every_config_field_and_refuses_a_foreign_folder(tiny_tokenizer, tmp_path,
                                                                              monkeypatch, capsys):
    from picochat import export
    from picochat.checkpoint import build_meta, run_dir, save_checkpoint

    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(tmp_path))
    tiny_tokenizer.save(tmp_path / "tokenizer")
    model = make_tiny_model(tiny_tokenizer.vocab_size, n_kv_head=2, window_pattern="SL")
    save_checkpoint(run_dir("sft", "r1", tmp_path), 7, model.state_dict(), None,
                    build_meta(model.config, None, tiny_tokenizer.hash(), 7, 1))
    out = tmp_path / "exported"
    assert export.main(["--format", "hf", "--source", "sft", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    for fl in fields(ModelConfig):
        assert config[fl.name] == getattr(model.config, fl.name), fl.name
    assert config["picochat"]["source"] == "sft" and config["picochat"]["step"] == 7
    loaded = AutoConfig.from_pretrained(str(out), trust_remote_code=True)
    assert (loaded.model_type, loaded.num_hidden_layers, loaded.max_position_embeddings) == ("picochat", 2, 128)
    assert export.main(["--format", "hf", "--source", "sft", "--out", str(out)]) == 0  # an earlier export: replaced

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert export.main(["--format", "hf", "--out", str(foreign)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "empty folder" in err[0]
    assert (foreign / "notes.txt").read_text() == "mine"
