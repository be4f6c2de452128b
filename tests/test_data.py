"""Corpora: the shard writer/reader, document splitting, `picochat data prepare/download/info` (the embedded
corpus's sources, Jane Austen from Debian's R package where installed, the chat sources' train rows as dialogues,
--sources), and the resumable downloader against a real threaded HTTP server on 127.0.0.1.

Run: OMP_NUM_THREADS=1 .venv/bin/pytest -x -q tests/test_data.py
"""

import io
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.util import find_spec

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat.common import UserError
from picochat.data import prepare as prep
from picochat.data.corpus import (corpus_dir, file_sha256, iter_documents, list_shards, load_manifest, verify_corpus,
                                  write_corpus)
from picochat.data.download import download_file, download_shards


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(tmp_path / "base"))
    return tmp_path / "base"


# ---------------------------------------------------------------------------------------------------------------------
# writer and reader


def test_write_and_read_back_a_corpus():
    docs = [f"document number {i} " * (i % 7 + 1) for i in range(100)]
    manifest = write_corpus("t", docs, rows_per_group=8, docs_per_shard=40, val_docs=16)
    assert [s["file"] for s in manifest["shards"]] == [f"shard_0000{i}.parquet" for i in range(4)]
    assert [s["split"] for s in manifest["shards"]] == ["train"] * 3 + ["val"]
    assert manifest["val_file"] == "shard_00003.parquet" and manifest["num_docs"] == 100
    assert [s["rows"] for s in manifest["shards"]] == [40, 40, 4, 16]
    assert manifest["shards"][0]["row_groups"] == [8] * 5 and manifest["shards"][3]["row_groups"] == [8, 8]
    assert list(iter_documents("train", "t")) == docs[:84]
    assert list(iter_documents("val", "t")) == docs[84:]
    assert [p.name for p in list_shards("val", "t")] == ["shard_00003.parquet"]
    for s in load_manifest("t")["shards"]:
        assert s["sha256"] == file_sha256(corpus_dir("t") / s["file"])
    assert pq.ParquetFile(corpus_dir("t") / "shard_00000.parquet").schema_arrow.names == ["text"]


def test_default_row_groups_give_the_val_shard_about_eight():
    manifest = write_corpus("auto", [f"doc {i}" for i in range(1000)])
    val = manifest["shards"][-1]
    assert val["rows"] == 100 and len(val["row_groups"]) == 9  # 100 docs // 8 = 12 per group -> 8 full + 1


def test_missing_and_corrupt_corpus_errors_name_the_thing():
    with pytest.raises(UserError, match=r"corpus 'default' not found at .*run `picochat data prepare`"):
        load_manifest()
    write_corpus("t", [f"doc {i} " * 50 for i in range(50)], rows_per_group=5, val_docs=10)
    shard = corpus_dir("t") / "shard_00000.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[:100])
    with pytest.raises(UserError, match=r"shard_00000\.parquet has 100 bytes.*re-run `picochat data prepare"):
        list(iter_documents("train", "t"))
    shard.write_bytes(b"\0" * len(data))  # right size, garbage content
    with pytest.raises(UserError, match=r"shard_00000\.parquet is missing or corrupt.*re-run"):
        list(iter_documents("train", "t"))
    with pytest.raises(UserError, match=r"shard_00000\.parquet does not match its sha256"):
        verify_corpus("t")
    shard.unlink()
    with pytest.raises(UserError, match=r"shard_00000\.parquet is missing"):
        list_shards("train", "t")
    with pytest.raises(UserError, match="split 'test'"):
        list_shards("test", "t")


# ---------------------------------------------------------------------------------------------------------------------
# splitting


def test_strip_gutenberg_keeps_only_the_book():
    text = ("The Project Gutenberg EBook of X\nlicence blah\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
            "Chapter 1\nIt was a dark night.\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore licence\n")
    assert prep.strip_gutenberg(text) == "Chapter 1\nIt was a dark night."
    assert prep.strip_gutenberg("  plain text  ") == "plain text"


def test_split_documents_bounds_headings_and_no_lost_text():
    scenes = []
    for i in range(12):
        scenes.append(f"ACT {i + 1}.")  # a bare heading must stay with the scene after it
        scenes.append(f"Scene {i + 1}. A room.\n\n" + "\n\n".join(f"SPEAKER.\nLine {i}-{j} " * (3 + i * j % 11)
                                                                    for j in range(4 + 9 * (i % 3))))
    text = "\n\n".join(scenes)
    docs = prep.split_documents(text, heading=r"^(ACT|Scene)\s+\d+", prefix="TITLE", min_chars=300,
                                max_chars=1500)
    assert all(len(d) <= 1500 for d in docs) and all(d.startswith("TITLE\n\n") for d in docs)
    assert sum(len(d) < 300 for d in docs) <= 1
    assert not any(re.fullmatch(r"TITLE\n\n(ACT|Scene) \d+\.?", d) for d in docs)
    body = "".join(d[len("TITLE\n\n"):] for d in docs)
    assert "".join(body.split()) == "".join(text.split())  # nothing lost, nothing duplicated


def test_overlong_paragraph_is_split_at_sentences():
    text = "Word word word. " * 2000  # 32 KB with no blank lines or newlines
    docs = prep.split_documents(text, max_chars=4000)
    assert len(docs) >= 8 and all(len(d) <= 4000 for d in docs)
    assert all(d.endswith("word.") for d in docs[:-1])


# ---------------------------------------------------------------------------------------------------------------------
# picochat data prepare


def _write_source(root):
    root.mkdir()
    (root / "a.txt").write_text("A short story about a cat.")
    (root / "big.txt").write_text("\n\n".join(f"Paragraph {i}. " + "x" * 900 for i in range(30)))
    (root / "sub").mkdir()
    (root / "sub" / "b.jsonl").write_text("\n".join(json.dumps({"text": f"json doc {i}", "id": i}) for i in range(5)))
    pq.write_table(pa.table({"text": [f"parquet doc {i}" for i in range(7)], "n": list(range(7))}), root / "c.parquet")


def test_prepare_from_a_folder_then_noop_then_force(tmp_path, capsys):
    src = tmp_path / "mine"
    _write_source(src)
    assert prep.main(["prepare", "--source", str(src), "--name", "mine", "--rows-per-group", "3"]) == 0
    docs = list(iter_documents("train", "mine")) + list(iter_documents("val", "mine"))
    assert "A short story about a cat." in docs and "json doc 4" in docs and "parquet doc 6" in docs
    assert sum(d.startswith("Paragraph") for d in docs) >= 3  # the 27 KB file was split into several documents
    assert len(docs) == len(set(docs)) == 1 + 5 + 7 + sum(d.startswith("Paragraph") for d in docs)
    first = (corpus_dir("mine") / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()
    assert prep.main(["prepare", "--source", str(src), "--name", "mine"]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert (corpus_dir("mine") / "manifest.json").stat().st_mtime_ns == first
    assert prep.main(["prepare", "--source", str(src), "--name", "mine", "--force", "--seed", "1"]) == 0
    redone = list(iter_documents("train", "mine")) + list(iter_documents("val", "mine"))
    assert sorted(redone) == sorted(docs) and redone != docs  # same docs, other shuffle


def test_prepare_bad_inputs_give_one_clear_line(tmp_path, capsys):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "x.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    assert prep.main(["prepare", "--source", str(src)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("picochat: error:") and "x.jsonl:2" in err and "\n" not in err
    assert prep.main(["prepare", "--source", str(tmp_path / "absent")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert prep.main(["frobnicate"]) == 2
    assert "unknown data command 'frobnicate'" in capsys.readouterr().err
    assert prep.main(["info", "--name", "nothing"]) == 2
    assert "corpus 'nothing' not found" in capsys.readouterr().err


def test_embedded_default_corpus(capsys, monkeypatch):
    monkeypatch.delenv("PICOCHAT_BIGBENCH_SDIST", raising=False)  # no sdist here: topical-chat is skipped, noted
    t0 = time.perf_counter()
    assert prep.main(["prepare"]) == 0
    out = capsys.readouterr().out
    manifest = load_manifest()
    assert manifest["num_chars"] > 5_000_000 and manifest["source"] == "embedded"
    assert manifest["docs_per_source"]["shakespeare"] > 500 and manifest["docs_per_source"]["kjv"] > 500
    assert "topical-chat" not in manifest["docs_per_source"] and "note: skipping source topical-chat" in out
    assert re.search(r"^  kjv +1,\d{3} docs +4,\d{3},\d{3} chars +\d+\.\d%$", out, re.M)
    val = [s for s in manifest["shards"] if s["split"] == "val"]
    assert len(val) == 1 and val[0]["file"] == manifest["shards"][-1]["file"] and len(val[0]["row_groups"]) >= 8
    docs = list(iter_documents("val"))
    assert len(docs) == val[0]["rows"] and max(len(d) for d in docs) <= prep.MAX_DOC_CHARS
    assert f"{manifest['num_docs']:,} docs" in out
    train = list(iter_documents("train"))
    assert any(d.startswith("HAMLET") for d in train + docs) and any(d.startswith("Genesis 1\n") for d in train + docs)
    assert not any("Project Gutenberg" in d for d in train[:200])
    assert prep.main(["prepare"]) == 0  # idempotent
    assert "already prepared" in capsys.readouterr().out
    assert time.perf_counter() - t0 < 60


needs_austen = pytest.mark.skipif(prep._austen_db() is None or find_spec("rdata") is None,
                                  reason="Jane Austen's novels: apt-get install --no-install-recommends "
                                         "r-cran-janeaustenr; pip install rdata==1.1.0 (runs/setup.sh does both)")


@needs_austen
def test_austen_reader_returns_the_six_novels_by_chapter():
    novels = prep.austen_novels()
    assert list(novels) == ["Sense and Sensibility", "Pride and Prejudice", "Mansfield Park", "Emma",
                            "Northanger Abbey", "Persuasion"]
    chapters = {t: len(re.findall(r"^(CHAPTER|Chapter) [IVXLC\d]+$", text, re.M)) for t, text in novels.items()}
    assert chapters == {"Sense and Sensibility": 50, "Pride and Prejudice": 61, "Mansfield Park": 48, "Emma": 55,
                        "Northanger Abbey": 31, "Persuasion": 24}
    # paragraphs unwrapped to one line, one space after a full stop
    assert ("\n\nIt is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
            "in want of a wife.\n\n") in novels["Pride and Prejudice"]
    assert "The family of Dashwood had long been settled in Sussex. Their estate" in novels["Sense and Sensibility"]
    assert "Emma Woodhouse, handsome, clever, and rich," in novels["Emma"]
    docs = prep.austen_docs(novels)
    assert all(len(d) <= prep.MAX_DOC_CHARS for d in docs) and sum(len(d) < prep.MIN_DOC_CHARS for d in docs) <= 25
    assert all(any(d.startswith(t + "\n\n") for t in novels) for d in docs)
    heads = [h for d in docs for h in re.findall(r"^(?:CHAPTER|Chapter) [IVXLC\d]+$", d, re.M)]
    assert len(heads) == sum(chapters.values()) == 269  # every chapter in exactly one document
    assert not any(re.search(r"VOLUME [IV]+$", d) for d in docs)  # a volume heading stays with its first chapter


needs_chat = pytest.mark.skipif(not all(find_spec(m) for m in ("chitchat_dataset", "chatterbot_corpus", "yaml")),
                                reason="pip install chitchat-dataset==0.9.0 chatterbot-corpus==1.3.3 pyyaml")


def test_dialogue_rendering():
    conv = {"messages": [{"role": "system", "content": "be nice"},
                         {"role": "user", "content": "Hi there\nhow are you?"},  # a burst, joined by the reader
                         {"role": "assistant", "content": "Fine,  thanks.\n"}, {"role": "user", "content": "Good"}]}
    assert prep.dialogue(conv) == "A: Hi there how are you?\nB: Fine, thanks.\nA: Good"


@needs_chat
def test_chat_text_is_the_train_rows_as_dialogues_and_no_held_out_row():
    from picochat.tasks import get_task
    from picochat.tasks.base import HeldOut

    docs = prep.chat_docs("chatterbot")
    assert docs[0].startswith("A: What is AI?\nB: Artificial Intelligence is the branch of engineering and science "
                              "devoted to constructing machines that think.\n\nA: ")
    assert all(len(d) <= prep.MAX_DOC_CHARS for d in docs)
    shown = {c for d in docs for c in d.split("\n\n")}  # chatterbot conversations are short: never split
    task = get_task("chatterbot")
    train, val = HeldOut(task, "train"), HeldOut(task, "val")
    assert {prep.dialogue(train[i]) for i in range(len(train))} == shown
    held = {prep.dialogue(val[i]) for i in range(len(val))}
    assert len(held) > 50 and not held & shown
    assert "A: Bend over\nB: That's personal!" in held and "A: Bend over\nB: That's personal!" not in "\n".join(docs)
    # chitchat's conversations are long, so documents are cut at turns: look for the start of each conversation
    task = get_task("chitchat")
    text = "\n\n".join(prep.chat_docs("chitchat"))
    train, val = HeldOut(task, "train"), HeldOut(task, "val")
    assert all(prep.dialogue(train[i])[:300] in text for i in range(0, len(train), 97))
    held = [d for d in (prep.dialogue(val[i]) for i in range(len(val))) if len(d) >= 200]  # "A: Hey!\nB: Hello!"
    assert len(held) > 300 and not any(d[:300] in text for d in held)  # begins many train chats: not a leak


def test_sources_flag_picks_sources_and_rejects_unknown_ones(capsys):
    assert prep.main(["prepare", "--sources", "kjv", "--name", "pick"]) == 0
    out = capsys.readouterr().out
    manifest = load_manifest("pick")
    assert list(manifest["docs_per_source"]) == ["kjv"] and manifest["docs_per_source"]["kjv"] == manifest["num_docs"]
    assert re.search(r"^  kjv +1,\d{3} docs +4,\d{3},\d{3} chars +100\.0%$", out, re.M)
    docs = list(iter_documents("train", "pick")) + list(iter_documents("val", "pick"))
    assert len(docs) == manifest["num_docs"] and any(d.startswith("Genesis 1\n") for d in docs)
    assert any(d.startswith("Revelation 22\n") or "\n\nRevelation 22\n" in d for d in docs)
    assert not any(d.startswith(("A: ", "HAMLET")) for d in docs)
    assert prep.main(["prepare", "--sources", "kjv,austen,nope", "--name", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("picochat: error: unknown --sources nope; the sources are shakespeare, kjv, austen, python-docs, "
                   "chitchat, chatterbot, topical-chat")
    assert prep.main(["prepare", "--sources", "shakespeare", "--name", "pick"]) == 2  # an existing corpus of others
    assert "holds the sources kjv, not shakespeare; pass --force" in capsys.readouterr().err
    assert prep.main(["prepare", "--sources", "kjv", "--name", "pick"]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert prep.main(["prepare", "--source", "somewhere", "--sources", "kjv"]) == 2
    assert "does not go with --source" in capsys.readouterr().err


def test_default_sources_skip_a_missing_one_with_a_note(capsys, monkeypatch):
    monkeypatch.setattr(prep, "PYTHON_DOCS_GLOB", "/nonexistent/python3*/html/_sources")
    monkeypatch.setattr(prep, "AUSTEN_DIRS", ("/nonexistent/janeaustenr",))
    names = prep.pick_sources("")
    out = capsys.readouterr().out
    assert "python-docs" not in names and "austen" not in names and names[:2] == ["shakespeare", "kjv"]
    assert "note: skipping source python-docs: not installed (`apt-get install python3-doc`)\n" in out
    assert ("note: skipping source austen: not installed (`apt-get install --no-install-recommends r-cran-janeaustenr; "
            "pip install rdata==1.1.0`)\n") in out
    with pytest.raises(UserError, match=r"Jane Austen's novels are not installed .*apt-get install"):
        prep.embedded_docs(["austen"])  # named, it is an error


# ---------------------------------------------------------------------------------------------------------------------
# downloads against a real local HTTP server


def parquet_bytes(n_docs, tag):
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"{tag} doc {i} " * 40 for i in range(n_docs)]}), buf, row_group_size=4)
    return buf.getvalue()


class ShardHandler(BaseHTTPRequestHandler):
    """Serves server.files; honours `Range: bytes=N-`; drops the connection halfway for names in server.drop_once;
    answers the statuses queued in server.fail_with[name] first; records every request in server.log."""

    def do_GET(self):
        srv = self.server
        name = self.path.lstrip("/")
        rng = self.headers.get("Range")
        srv.log.append((name, rng))
        if srv.fail_with.get(name):
            self.send_error(srv.fail_with[name].pop(0))
            return
        if name not in srv.files:
            self.send_error(404)
            return
        data = srv.files[name]
        start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng and not srv.ignore_range else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if name in srv.drop_once:
            srv.drop_once.discard(name)
            self.wfile.write(data[start:start + (len(data) - start) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data[start:])

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), ShardHandler)
    srv.files, srv.drop_once, srv.fail_with, srv.log, srv.ignore_range = {}, set(), {}, [], False
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_download_resumes_after_a_dropped_connection(server, tmp_path):
    data = parquet_bytes(40, "resume")
    server.files["s.parquet"] = data
    server.drop_once.add("s.parquet")
    dest = tmp_path / "s.parquet"
    digest = download_file(f"{server.base}/s.parquet", dest, backoff=0.01, sha256=None)
    assert dest.read_bytes() == data and digest == file_sha256(dest)
    assert not (tmp_path / "s.parquet.partial").exists()
    assert server.log[0] == ("s.parquet", None) and server.log[1] == ("s.parquet", f"bytes={len(data) // 2}-")


def test_download_restarts_when_the_server_ignores_range(server, tmp_path):
    data = parquet_bytes(30, "norange")
    server.files["s.parquet"] = data
    server.drop_once.add("s.parquet")
    server.ignore_range = True
    download_file(f"{server.base}/s.parquet", tmp_path / "s.parquet", backoff=0.01)
    assert (tmp_path / "s.parquet").read_bytes() == data


def test_download_retries_transient_errors_but_not_404(server, tmp_path):
    server.files["s.parquet"] = data = parquet_bytes(10, "retry")
    server.fail_with["s.parquet"] = [503, 500]
    download_file(f"{server.base}/s.parquet", tmp_path / "s.parquet", backoff=0.01)
    assert (tmp_path / "s.parquet").read_bytes() == data and len(server.log) == 3
    with pytest.raises(UserError, match="HTTP 404"):
        download_file(f"{server.base}/missing.parquet", tmp_path / "m.parquet", backoff=0.01)
    assert len(server.log) == 4  # no retries for a file that does not exist


def test_download_wrong_hash_or_size_leaves_no_file(server, tmp_path):
    server.files["s.parquet"] = data = parquet_bytes(10, "hash")
    dest = tmp_path / "s.parquet"
    with pytest.raises(UserError, match="sha256"):
        download_file(f"{server.base}/s.parquet", dest, sha256="0" * 64, backoff=0.01)
    assert not dest.exists() and not (tmp_path / "s.parquet.partial").exists()
    with pytest.raises(UserError, match=f"expected {len(data) + 1}"):
        download_file(f"{server.base}/s.parquet", dest, expected_size=len(data) + 1, backoff=0.01)
    assert not dest.exists() and not (tmp_path / "s.parquet.partial").exists()
    good = download_file(f"{server.base}/s.parquet", dest, sha256=file_sha256_bytes(data), expected_size=len(data))
    assert good == file_sha256_bytes(data) and dest.read_bytes() == data


def file_sha256_bytes(data):
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_unreachable_hosts_fail_fast_with_one_line(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for url, why in [(f"http://127.0.0.1:{port}/s.parquet", "connection refused"),
                     ("http://no-such-host.invalid/s.parquet", "DNS lookup failed")]:
        t0 = time.perf_counter()
        with pytest.raises(UserError, match=f"cannot reach .*{why}"):
            download_shards({"s.parquet": url}, tmp_path, workers=2, progress=lambda *_: None, backoff=1.0)
        assert time.perf_counter() - t0 < 3  # no 5 retries with backoff
    assert not list(tmp_path.iterdir())


def test_cli_download_builds_a_readable_corpus(server, capsys):
    for i in (0, 1, 1822):
        server.files[f"shard_{i:05d}.parquet"] = parquet_bytes(12, f"s{i}")
    server.drop_once.add("shard_00001.parquet")
    args = ["download", "--dataset", "fineweb-edu", "--num-shards", "2", "--workers", "3", "--base-url", server.base]
    assert prep.main(args) == 0
    manifest = load_manifest("fineweb-edu")
    assert [s["file"] for s in manifest["shards"]] == ["shard_00000.parquet", "shard_00001.parquet",
                                                       "shard_01822.parquet"]
    assert manifest["val_file"] == "shard_01822.parquet" and manifest["shards"][0]["row_groups"] == [4, 4, 4]
    assert list(iter_documents("val", "fineweb-edu"))[0].startswith("s1822 doc 0")
    assert len(list(iter_documents("train", "fineweb-edu"))) == 24
    verify_corpus("fineweb-edu")
    n = len(server.log)
    assert prep.main(args) == 0 and len(server.log) == n  # everything present: no requests at all
    capsys.readouterr()
    assert prep.main(["download", "--num-shards", "1", "--name", "other", "--base-url", server.base + "/x"]) == 2
    assert "HTTP 404" in capsys.readouterr().err


def test_python_docs_reader_splits_rest_sources(tmp_path):
    root = tmp_path / "_sources" / "library"
    root.mkdir(parents=True)
    sections = [f"Section {i}\n{'=' * 10}\n\n" + f"The function f{i} returns a value. " * 60 for i in range(6)]
    (root / "functions.rst.txt").write_text("\n\n".join(sections))
    (root / "tiny.rst.txt").write_text("Tiny\n====\n\nOne line.")
    docs = prep.python_docs(tmp_path / "_sources")
    assert "Tiny\n====\n\nOne line." in docs
    assert len(docs) >= 3 and all(len(d) <= prep.MAX_DOC_CHARS for d in docs)
    assert sum(d.count("returns a value.") for d in docs) == 360
