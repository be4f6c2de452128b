"""Corpus storage: parquet shards with one `text` column plus a manifest.json, and the functions that read them.

Every corpus (the embedded offline default, your own files, downloaded hub shards) lives under
`get_base_dir()/corpus/<name>/` as `shard_NNNNN.parquet` files and a `manifest.json` recording each file's size,
sha256, row count, row-group sizes and split. The validation split is always one shard: the last one in file order.
Readers (tokenizer training, the packing loader, evals) go through this module only, so all sources look the same.

Build a corpus with `picochat data prepare` (see picochat/data/prepare.py); inspect one with `picochat data info`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from picochat.common import UserError, get_base_dir

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")


def corpus_dir(corpus: str = "default") -> Path:
    """Folder of the corpus `corpus` (not created here)."""
    if not corpus or "/" in corpus or "\\" in corpus or corpus.startswith("."):
        raise UserError(f"corpus name '{corpus}' is not a plain folder name; use letters, digits, '-' or '_'")
    return get_base_dir() / "corpus" / corpus


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# writing


def write_manifest(directory: Path, files: list[str], val_file: str, *, name: str, source: str,
                   extra: dict | None = None, hashes: dict[str, str] | None = None) -> dict:
    """Describe existing parquet `files` (names inside `directory`) in a manifest; `val_file` is the val shard.

    Row counts and row-group sizes come from each file's parquet footer; `hashes` (name -> sha256) skips re-hashing
    files whose digest the caller already knows (a download just computed it). Written atomically.
    """
    if val_file not in files:
        raise UserError(f"validation shard {val_file} is not among the corpus files in {directory}")
    shards, num_docs = [], 0
    for fname in files:
        path = directory / fname
        meta = open_shard(path, name).metadata
        groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        shards.append({
            "file": fname,
            "bytes": path.stat().st_size,
            "sha256": (hashes or {}).get(fname) or file_sha256(path),
            "rows": sum(groups),
            "row_groups": groups,
            "split": "val" if fname == val_file else "train",
        })
        num_docs += sum(groups)
    manifest = {"version": MANIFEST_VERSION, "name": name, "source": source, "text_column": "text",
                "num_docs": num_docs, "val_file": val_file, "shards": shards, **(extra or {})}
    tmp = directory / (MANIFEST + ".tmp")
    # one line per shard keeps a 1,800-shard manifest readable (and diffable)
    rows = ",\n  ".join(json.dumps(s) for s in shards)
    text = json.dumps({**manifest, "shards": "@"}, indent=1).replace('"shards": "@"', f'"shards": [\n  {rows}\n ]')
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, directory / MANIFEST)
    return manifest


def write_corpus(name: str, docs: list[str], *, rows_per_group: int = 0, docs_per_shard: int = 8192,
                 val_docs: int = 0, source: str = "", extra: dict | None = None) -> dict:
    """Write `docs` (in the given order: shuffle first if you want that) as a corpus; returns its manifest.

    The last `val_docs` documents (0 = a tenth, at most one shard) become the validation shard, which is written last
    so it is the last file. `rows_per_group` 0 picks val_docs // 8 (clamped to 1..1024) so that the val shard has
    about 8 row groups: the loader shards row groups across ranks, so val must have at least world_size of them.
    Old shards in the folder are removed first; the manifest is written last, so an interrupted run leaves no valid
    corpus behind.
    """
    docs = [d for d in docs if d]
    if len(docs) < 2:
        raise UserError(f"corpus '{name}' needs at least 2 non-empty documents (one train, one val), got {len(docs)}")
    if val_docs <= 0:
        val_docs = min(max(1, len(docs) // 10), docs_per_shard)
    val_docs = min(val_docs, len(docs) - 1)
    if rows_per_group <= 0:
        rows_per_group = min(max(1, val_docs // 8), 1024)
    directory = corpus_dir(name)
    directory.mkdir(parents=True, exist_ok=True)
    for old in [directory / MANIFEST, *directory.glob("shard_*.parquet")]:
        old.unlink(missing_ok=True)
    train, val = docs[:-val_docs], docs[-val_docs:]
    chunks = [train[i:i + docs_per_shard] for i in range(0, len(train), docs_per_shard)] + [val]
    files = []
    for i, chunk in enumerate(chunks):
        fname = shard_name(i)
        tmp = directory / (fname + ".tmp")
        table = pa.table({"text": pa.array(chunk, type=pa.string())})
        pq.write_table(table, tmp, row_group_size=rows_per_group, compression="zstd")
        os.replace(tmp, directory / fname)
        files.append(fname)
    stats = {"num_chars": sum(len(d) for d in docs), **(extra or {})}
    return write_manifest(directory, files, files[-1], name=name, source=source, extra=stats)


# ---------------------------------------------------------------------------------------------------------------------
# reading


def open_shard(path: Path, corpus: str) -> pq.ParquetFile:
    """Open one shard for reading; a missing or unreadable file becomes a UserError naming it."""
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"corpus shard {path} is missing or corrupt ({e}); re-run `picochat data prepare` "
                        f"(or download) for corpus '{corpus}' with --force") from None


def load_manifest(corpus: str = "default") -> dict:
    """The corpus manifest, after checking every shard exists with the recorded size (cheap: no hashing).

    Use `verify_corpus` for the full sha256 check.
    """
    directory = corpus_dir(corpus)
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"corpus '{corpus}' not found at {directory}; run `picochat data prepare`"
                        + ("" if corpus == "default" else f" --name {corpus}") + " first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        shards = manifest["shards"]
        [(s["file"], s["bytes"], s["split"], s["row_groups"]) for s in shards]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"corpus manifest {path} is unreadable ({e}); re-run `picochat data prepare --force`") from None
    for s in shards:
        shard = directory / s["file"]
        if not shard.is_file():
            raise UserError(f"corpus shard {shard} is missing; re-run `picochat data prepare --force` for '{corpus}'")
        size = shard.stat().st_size
        if size != s["bytes"]:
            raise UserError(f"corpus shard {shard} has {size} bytes but the manifest says {s['bytes']} (truncated or "
                            f"replaced); re-run `picochat data prepare --force` for '{corpus}'")
    return manifest


def verify_corpus(corpus: str = "default") -> dict:
    """load_manifest plus a sha256 check of every shard; UserError naming the first bad shard."""
    manifest = load_manifest(corpus)
    directory = corpus_dir(corpus)
    for s in manifest["shards"]:
        if file_sha256(directory / s["file"]) != s["sha256"]:
            raise UserError(f"corpus shard {directory / s['file']} does not match its sha256 in the manifest; "
                            f"re-run `picochat data prepare --force` for '{corpus}'")
    return manifest


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"split '{split}' is not one of {', '.join(SPLITS)}")


def list_shards(split: str, corpus: str = "default") -> list[Path]:
    """Shard paths of `split` ('train' or 'val') in manifest order."""
    _check_split(split)
    directory = corpus_dir(corpus)
    return [directory / s["file"] for s in load_manifest(corpus)["shards"] if s["split"] == split]


def row_groups(split: str, corpus: str = "default") -> list[tuple[Path, int, int]]:
    """Every row group of `split`, counted across its shards in order: (shard path, group index in file, rows)."""
    _check_split(split)
    directory = corpus_dir(corpus)
    out = []
    for s in load_manifest(corpus)["shards"]:
        if s["split"] == split:
            out += [(directory / s["file"], i, n) for i, n in enumerate(s["row_groups"])]
    return out


def read_row_group(path: Path, index: int, corpus: str = "default", pf: pq.ParquetFile | None = None) -> list[str]:
    """The `text` values of one row group; a corrupt shard becomes a UserError naming it."""
    pf = pf or open_shard(path, corpus)
    try:
        return pf.read_row_group(index, columns=["text"]).column("text").to_pylist()
    except (OSError, KeyError, pa.ArrowException) as e:
        raise UserError(f"corpus shard {path} is corrupt or lacks a `text` column (row group {index}: {e}); "
                        f"re-run `picochat data prepare --force` for corpus '{corpus}'") from None


def iter_documents(split: str = "train", corpus: str = "default") -> Iterator[str]:
    """All documents of `split`, in shard and row order (one row group in memory at a time)."""
    open_path, pf = None, None
    for path, index, _ in row_groups(split, corpus):
        if path != open_path:  # shards are read front to back, so one open file at a time suffices
            open_path, pf = path, open_shard(path, corpus)
        yield from read_row_group(path, index, corpus, pf)


def corpus_fingerprint(manifest: dict) -> str:
    """Short id of a corpus's exact content (file names + hashes), stored in loader states to catch mismatches."""
    h = hashlib.sha256()
    for s in manifest["shards"]:
        h.update(f"{s['file']}:{s['sha256']}:{s['split']};".encode())
    return h.hexdigest()[:16]


def describe(manifest: dict) -> str:
    n_train = sum(s["rows"] for s in manifest["shards"] if s["split"] == "train")
    n_val = sum(s["rows"] for s in manifest["shards"] if s["split"] == "val")
    size = sum(s["bytes"] for s in manifest["shards"])
    chars = f", {manifest['num_chars']:,} chars" if "num_chars" in manifest else ""
    return (f"{manifest['num_docs']:,} docs{chars}, {len(manifest['shards'])} shards ({size / 1e6:.1f} MB; "
            f"train {n_train:,} docs, val {n_val:,} docs in {manifest['val_file']})")

