"""The ``pythia-jax`` command: one entry point, one module per subcommand.

Each subcommand lives in ``pythia_jax/commands/<name>.py`` and defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Command modules import heavy libraries
(JAX, torch) inside ``run`` so that ``--help`` stays fast.

Gin flags follow the T5X convention and are accepted by every subcommand that declares
``USES_GIN = True``: ``--gin_file=PATH`` (repeatable) and ``--gin.NAME=VALUE``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import re
import sys
import warnings
from typing import Iterator, Sequence

from pythia_jax.errors import ConfigError, PythiaJaxError

# (subcommand, module) in the order --help lists them.
SUBCOMMANDS: tuple[tuple[str, str], ...] = (
    ("train", "pythia_jax.commands.train"),
    ("convert", "pythia_jax.commands.convert"),
    ("eval", "pythia_jax.commands.eval"),
    ("plot", "pythia_jax.commands.plot"),
    ("generate", "pythia_jax.commands.generate"),
    ("preprocess", "pythia_jax.commands.preprocess"),
    ("preshuffle", "pythia_jax.commands.preshuffle"),
    ("batches", "pythia_jax.commands.batches"),
    ("count", "pythia_jax.commands.count"),
    ("count-merge", "pythia_jax.commands.count_merge"),
    ("term-frequency", "pythia_jax.commands.term_frequency"),
    ("info", "pythia_jax.commands.info"),
    ("audit", "pythia_jax.commands.audit"),
    ("memorization-report", "pythia_jax.commands.memorization_report"),
)

# Subcommands that hand all their arguments to another tool's parser.
PASSTHROUGH_COMMANDS: tuple[tuple[str, str], ...] = (
    ("lm-eval", "pythia_jax.commands.lm_eval"),
)

DESCRIPTION = """\
pythia-jax: train, evaluate and convert Pythia (GPT-NeoX) models in JAX, with the exact
Pythia data order.

Start with the built-in demo:  pythia-jax train --gin_file=configs/demo.gin
"""


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Split ``argv`` into (other args, gin files, gin bindings).

    ``--gin_file=a.gin`` / ``--gin_file a.gin`` and ``--gin.NAME=VALUE`` / ``--gin.NAME VALUE``
    are taken out; everything else is returned in order for argparse.
    """
    rest: list[str] = []
    files: list[str] = []
    bindings: list[str] = []
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--gin_file" or arg == "--gin-file":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise SystemExit(f"pythia-jax: {arg} needs a path")
            files.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--gin_file=") or arg.startswith("--gin-file="):
            files.append(arg.split("=", 1)[1])
        elif arg.startswith("--gin."):
            body = arg[len("--gin."):]
            if "=" in body:
                name, value = body.split("=", 1)
            else:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):  # not the next flag
                    raise SystemExit(f"pythia-jax: {arg} needs a value ({arg}=VALUE)")
                name, value = body, argv[i + 1]
                i += 1
            bindings.append(f"{name} = {value}")
        else:
            rest.append(arg)
        i += 1
    return rest, files, bindings


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks and appends ``(default: X)`` to every option whose
    default is a value (not None, False or an empty list) and whose help does not already name it
    (``%(default)s``, ``default:`` or ``(default …``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default:" in text or "(default " in text or default is None or default is False
                or default == [] or default is argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from pythia_jax import __version__

    parser = argparse.ArgumentParser(
        prog="pythia-jax", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pythia-jax {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS:
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                           formatter_class=HelpFormatter)
        if getattr(module, "USES_GIN", False):
            p.add_argument("--gin_file", action="append", default=[], metavar="PATH",
                           help="gin file to parse (repeatable; searched in ., configs/)")
            p.add_argument("--gin.NAME=VALUE", dest="_gin_doc", metavar="",
                           help="override one gin binding, e.g. --gin.TrainConfig.num_steps=100")
        module.add_arguments(p)
        p.set_defaults(_module=module, _parser=p)
    for name, module_name in PASSTHROUGH_COMMANDS:  # listed in --help; parsed by the wrapped tool
        module = importlib.import_module(module_name)
        sub.add_parser(name, help=module.HELP, add_help=False).set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = dict(PASSTHROUGH_COMMANDS)
    if argv and argv[0] in passthrough:  # every argument belongs to the wrapped tool
        module = importlib.import_module(passthrough[argv[0]])
        args = argparse.Namespace(command=argv[0], _module=module, passthrough_args=argv[1:])
        return _run(module, args)
    rest, gin_files, gin_bindings = split_gin_flags(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(rest)
    if extra:  # the subcommand's usage and its closest options, not the top-level usage
        _unrecognized(getattr(args, "_parser", parser), extra)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    module = args._module
    if (gin_files or gin_bindings) and not getattr(module, "USES_GIN", False):
        parser.error(f"'{args.command}' does not take gin flags")
    args.gin_files = gin_files
    args.gin_bindings = gin_bindings
    return _run(module, args)


def _unrecognized(parser: argparse.ArgumentParser, extra: Sequence[str]) -> None:
    """``parser.error`` (exit 2, the subcommand's usage) naming the arguments it does not take and,
    for a misspelt option (``--max-steps``), the options it does take that are closest."""
    import difflib

    options = [o for a in parser._actions for o in a.option_strings]
    hints = []
    for arg in extra:
        if arg.startswith("-"):
            close = difflib.get_close_matches(arg.split("=", 1)[0], options, n=2, cutoff=0.75)
            if close:
                hints.append(f"{arg}: did you mean {' or '.join(close)}?")
    parser.error(f"unrecognized arguments: {' '.join(extra)}" + (f" ({'; '.join(hints)})" if hints else ""))


def _run(module, args: argparse.Namespace) -> int:
    """Run one subcommand. Input errors and I/O failures (a full disk, a read-only or missing
    folder, an unreadable file) become one line on stderr and exit status 2; Ctrl-C exits 130; a
    closed stdout (``pythia-jax info | head -1``) ends quietly with 141, as a tool killed by
    SIGPIPE."""
    with console_logging():
        try:
            from pythia_jax.io_utils.interrupts import watch_interrupts
            with watch_interrupts():  # a Ctrl-C that Python drops still stops every publication
                rc = int(module.run(args) or 0)
            sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
            return rc
        except KeyboardInterrupt:
            with _progress_bars_cleared(sys.stderr):
                print(f"pythia-jax {args.command}: interrupted", file=sys.stderr)
            return 130
        except (PythiaJaxError, ConfigError) as e:
            print(f"pythia-jax {args.command}: error: {one_line(without_gin_context(str(e)), limit=2000)}",
                  file=sys.stderr)
            return 2
        except Exception as e:  # noqa: BLE001 - only OS-level failures are reported here
            if isinstance(_find_os_error(e), BrokenPipeError):
                return _stdout_closed()
            message = describe_os_failure(e, args)
            if message is None:
                raise
            print(f"pythia-jax {args.command}: error: {message}", file=sys.stderr)
            return 2


def _stdout_closed() -> int:
    """Exit status 141 (128 + SIGPIPE) after the reader of stdout went away; stdout then points
    at /dev/null, so the interpreter's final flush cannot raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (a replaced sys.stdout)
        pass
    return 141


# ----------------------------------------------------------------------------- I/O failures
# Where each command writes, for the hint of a failed write.
_OUTPUT_FLAGS = {"train": "--gin.TrainConfig.output_dir", "convert": "OUTPUT", "preprocess": "--output-prefix",
                 "preshuffle": "--out", "batches": "--out", "eval": "--out", "plot": "--out"}
_OUTPUT_ATTRS = ("out", "output", "output_prefix")

# Failures that tensorstore / Orbax report in their own exception types, recognised by strerror.
_ERRNO_TEXTS = {errno.ENOSPC: "No space left on device", errno.EROFS: "Read-only file system",
                errno.EDQUOT: "Disk quota exceeded"}


def _find_os_error(exc: BaseException) -> OSError | None:
    """The first OSError in ``exc``'s cause/context chain (itself included)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def describe_os_failure(exc: BaseException, args: argparse.Namespace | None = None) -> str | None:
    """One line for an OS-level failure: the path, the reason and what to do; None when ``exc``
    is not one (a programming error keeps its traceback)."""
    command = getattr(args, "command", None)
    flag = _OUTPUT_FLAGS.get(command or "", "the output location")
    output = next((getattr(args, a) for a in _OUTPUT_ATTRS if getattr(args, a, None)), None)
    os_error = _find_os_error(exc)
    if os_error is None:
        text = str(exc)
        code = next((c for c, t in _ERRNO_TEXTS.items() if t in text), None)
        if code is None:
            return None
        os_error = OSError(code, _ERRNO_TEXTS[code])
    code, reason = os_error.errno, os_error.strerror or one_line(str(os_error)) or type(os_error).__name__
    paths = [_published_name(p) for p in (os_error.filename, os_error.filename2) if p is not None]
    where = " -> ".join(str(p) for p in paths) if paths else (f"writing {output}" if output else "")
    hints = {
        errno.ENOSPC: f"free some space or choose another {flag}",
        errno.EDQUOT: f"free some space (disk quota) or choose another {flag}",
        errno.EROFS: f"the file system is read-only: choose another {flag}",
        errno.EACCES: f"no permission: choose a location you can write (another {flag}) or fix the permissions",
        errno.EPERM: f"not permitted: choose another {flag} or fix the permissions",
        errno.ENOENT: "check the path (a missing file or parent folder)",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EISDIR: "the path is a folder where a file was expected",
        errno.EIO: "the device reported an I/O error: check the disk",
    }
    hint = hints.get(code)
    return "; ".join(x for x in (f"{where}: {reason}" if where else reason, hint) if x)


_TEMPORARY = (re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{6,}\.tmp$"),  # files: mkstemp siblings
              re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-[A-Za-z0-9_]+$"))  # folders: atomic_output_dir


def _published_name(path) -> str:
    """The output a temporary sibling (``.NAME.xxxxxxxx.tmp``, ``.NAME.tmp-xxxx``) stands for."""
    path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path)
    head, tail = os.path.split(path)
    for pattern in _TEMPORARY:
        m = pattern.match(tail)
        if m:
            return os.path.join(head, m.group("name"))
    return path


# What gin appends to an exception raised inside a configurable (gin/config.py, once per
# enclosing call): "\n  In call to configurable 'TrainConfig' (<class '...'>)[ in scope 'x']".
_GIN_CONTEXT = re.compile(r"\s*In call to configurable '[^']*' \(<[^>]*>\)(?: in scope '[^']*')?")


def without_gin_context(text: str) -> str:
    """``text`` without the lines gin appends to an error raised inside a configurable: the
    one-line message names the setting already."""
    return _GIN_CONTEXT.sub("", text)


def one_line(text: str, limit: int = 400) -> str:
    """``text`` on one line (newlines collapsed); an over-long text keeps its start and its end."""
    text = " ".join(text.split())
    if len(text) > limit:
        head = limit * 2 // 3
        text = text[:head] + " … " + text[-(limit - head):]
    return text


# ---------------------------------------------------------------------------------- logging
class _ConsoleFormatter(logging.Formatter):
    """``pythia-jax: warning: <message>``, always one line."""

    def format(self, record: logging.LogRecord) -> str:
        message = one_line(record.getMessage())
        if record.levelno >= logging.WARNING:
            return f"pythia-jax: {record.levelname.lower()}: {message}"
        return f"pythia-jax: {message}"


@contextlib.contextmanager
def _progress_bars_cleared(stream) -> Iterator[None]:
    """Write to ``stream`` on a line of its own: tqdm bars on the console (e.g. ``train``'s) are
    cleared first and redrawn after (``tqdm.external_write_mode``, what ``tqdm.write`` uses);
    without it a log line or the Ctrl-C message was appended to the bar's line."""
    tqdm = sys.modules.get("tqdm")  # no bar can be active when tqdm was never imported
    if tqdm is None or not hasattr(tqdm, "tqdm"):
        yield
        return
    with tqdm.tqdm.external_write_mode(file=stream):
        yield


class _ConsoleHandler(logging.StreamHandler):
    """A StreamHandler whose records start on a fresh line while a progress bar is shown."""

    def emit(self, record: logging.LogRecord) -> None:
        with _progress_bars_cleared(self.stream):
            super().emit(record)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` replacement: the warning as one log line (no file, no source line)."""
    text = str(message)
    if category is not UserWarning:
        text = f"{category.__name__}: {text}"
    logging.getLogger("py.warnings").warning("%s", text)


@contextlib.contextmanager
def console_logging() -> Iterator[None]:
    """While a command runs: log records (the package's INFO and up, others' WARNING and up) and
    Python warnings go to stderr, one readable line each. Restores the previous setup after."""
    handler = _ConsoleHandler(sys.stderr)
    handler.setFormatter(_ConsoleFormatter())
    root, package = logging.getLogger(), logging.getLogger("pythia_jax")
    saved = root.level, package.level, warnings.showwarning
    # a bare console handler set up before (logging.basicConfig, e.g. by absl on import) would print
    # each record a second time in its own format: it rests while the command runs
    resting = [h for h in root.handlers if type(h) is logging.StreamHandler
               and getattr(h, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)]
    for h in resting:
        root.removeHandler(h)
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    if package.level == logging.NOTSET or package.level > logging.INFO:
        package.setLevel(logging.INFO)
    warnings.showwarning = _show_warning
    try:
        yield
    finally:
        root.removeHandler(handler)
        for h in resting:
            root.addHandler(h)
        root.setLevel(saved[0])
        package.setLevel(saved[1])
        warnings.showwarning = saved[2]


def entry() -> None:
    """The ``pythia-jax`` console script: process settings first (``process_env``: large host
    allocations on transparent huge pages, which XLA:CPU's per-step buffers need), then ``main``."""
    from pythia_jax.process_env import reexec_with_huge_pages

    reexec_with_huge_pages()
    rc = main()
    if rc == 130:
        _exit_after_interrupt()
    sys.exit(rc)


def _exit_after_interrupt() -> None:
    """End the process after Ctrl-C without the interpreter's teardown: exit handlers run and the
    streams are flushed, then ``os._exit(130)``. A Ctrl-C that stopped a computation part-way
    (e.g. ``eval`` scoring) left native state that the teardown's destructors crashed on, in 4 of
    6 tries: exit status 139 (a segmentation fault) instead of 130, after the outputs were safe."""
    import atexit

    try:
        atexit._run_exitfuncs()  # what sys.exit would run (orbax, jax.distributed, logging)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(130)


if __name__ == "__main__":
    entry()
