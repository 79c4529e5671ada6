"""The ``lisa-kit`` command line.

This module holds the framework (``main``, :func:`add_subcommand`, error and exit-code
handling) and the recipe and plugin commands (``plugins``, ``validate``, ``recipe``); each
other command group is a module of this package that registers itself when imported:
``segment`` (segment, chat), ``train``, ``eval``, ``export``, ``data``, ``bench``, ``demo``,
``compare`` (compare-original).

Subcommands are registered with :func:`add_subcommand` (a space in the name nests it
under a group made with :func:`add_command_group`, e.g. ``"recipe show"``); each has a
``setup(parser)`` that adds its arguments and a ``run(args) -> int``. Heavy modules
are imported inside ``run`` so ``--help`` stays fast.

Exit codes: 0 success, 1 a checked thing failed (e.g. ``validate``), 2 usage error or
a :class:`~lisa_kit.errors.LisaKitError` (printed as one ``error: ...`` line), 130
interrupted, 141 stdout closed early (``lisa-kit plugins --json | head``; no traceback).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lisa_kit import __version__
from lisa_kit.errors import LisaKitError, PluginWarning

__all__ = ["main", "add_subcommand", "add_command_group", "build_parser"]


@dataclass
class _Command:
    path: tuple[str, ...]
    help: str
    setup: Callable[[argparse.ArgumentParser], None] | None
    run: Callable[[argparse.Namespace], int] | None  # None: a group
    description: str | None = None
    epilog: str | None = None


_COMMANDS: dict[tuple[str, ...], _Command] = {}


def add_command_group(name: str, help: str, *, description: str | None = None) -> None:
    """Declare a group such as ``recipe`` that holds subcommands (``recipe show``)."""
    path = tuple(name.split())
    _COMMANDS[path] = _Command(path, help, None, None, description)


def add_subcommand(name: str, help: str, setup: Callable[[argparse.ArgumentParser], None] | None,
                   run: Callable[[argparse.Namespace], int], *, description: str | None = None,
                   epilog: str | None = None) -> None:
    """Register ``lisa-kit <name>``; ``name`` may be nested (``"recipe show"``)."""
    path = tuple(name.split())
    if len(path) > 1 and path[:-1] not in _COMMANDS:
        raise ValueError(f"add the command group {' '.join(path[:-1])!r} first")
    _COMMANDS[path] = _Command(path, help, setup, run, description, epilog)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="lisa-kit",
        description="Reasoning segmentation (LISA) assembled from swappable plugin components.",
        epilog="Run `lisa-kit COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"lisa-kit {__version__}")
    parsers: dict[tuple[str, ...], argparse.ArgumentParser] = {(): parser}
    children: dict[tuple[str, ...], argparse._SubParsersAction] = {}
    for path, command in _COMMANDS.items():
        parent = path[:-1]
        if parent not in children:
            children[parent] = parsers[parent].add_subparsers(metavar="COMMAND", title="commands")
        # Raw formatting keeps the examples' line breaks; descriptions are wrapped here.
        description = "\n".join(textwrap.fill(par, 79) for par in
                                (command.description or command.help).split("\n"))
        sub = children[parent].add_parser(
            path[-1], help=command.help, description=description,
            epilog=command.epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        parsers[path] = sub
        if command.run is None:
            sub.set_defaults(_run=None, _parser=sub)
        else:
            if command.setup is not None:
                command.setup(sub)
            sub.set_defaults(_run=command.run, _parser=sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    # Plugin load failures are expected situations for users, not code locations.
    if issubclass(category, PluginWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def _is_override(arg: str) -> bool:
    return not arg.startswith("-") and ("=" in arg or arg.startswith("~"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lisa-kit`` and ``python -m lisa_kit``; returns the exit code."""
    try:
        return _main(argv)
    except BrokenPipeError:  # the reader of stdout went away (argparse's own --help output copes by itself)
        return _stdout_closed()


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # argparse stops filling a positional KEY=VALUE list at the first option, so
        # `train RECIPE --out DIR k=v` would reject k=v: overrides may come anywhere.
        if extra and isinstance(getattr(args, "overrides", None), list) and all(_is_override(e) for e in extra):
            args.overrides.extend(extra)
        elif extra:
            getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    run = getattr(args, "_run", None)
    if run is None:
        getattr(args, "_parser", parser).print_help(sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            code = int(run(args) or 0)
            sys.stdout.flush()  # a closed pipe shows up here for buffered output
            return code
        except LisaKitError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            if exc.errno not in _STORAGE_ERRNOS:
                raise
            # Where a command writes its results (masks, result.json, exports, metrics): a full
            # disk or a read-only folder is the user's to fix, said in one line. What was written
            # before stays (every writer replaces its files atomically).
            where = f": {exc.filename}" if exc.filename else ""
            print(f"error: cannot write{where}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130


# Errors of the storage a command writes to, not of lisa_kit: reported in one line.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

# Exit status of a process ended by SIGPIPE in a shell (128 + 13), as `yes | head` gives.
EXIT_BROKEN_PIPE = 141


def _stdout_closed() -> int:
    """The reader of stdout went away (``lisa-kit plugins --json | head``): stop quietly.

    Python's documented recipe: point stdout at devnull, so the interpreter's final
    flush of what is still buffered cannot raise again at exit.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor
        pass
    return EXIT_BROKEN_PIPE


# -- plugins --------------------------------------------------------------------
def _setup_plugins(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also print the traceback of each plugin that failed to load")


def _plugin_record(info) -> dict:
    return {
        "name": info.name, "module": info.module, "distribution": info.distribution,
        "version": info.version, "status": "skipped" if info.skipped else ("failed" if info.error else "ok"),
        "error": info.error, "skipped": info.skipped,
        "components": [f"{kind}:{name}" for kind, name in info.components],
        "clashes": list(info.clashes),
    }


def _run_plugins(args: argparse.Namespace) -> int:
    from lisa_kit import registry as _registry

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)  # the table reports failures itself
        plugins = _registry.get_registry().plugins
    if args.json:
        print(json.dumps([_plugin_record(p) for p in plugins], indent=2))
        return 0
    rows = [(p.name, p.distribution, p.version, p.status,
             ", ".join(f"{k}:{n}" for k, n in p.components) or "-") for p in plugins]
    headers = ("plugin", "distribution", "version", "status", "components")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
        for row in [headers, *rows]:
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    else:
        from rich.markup import escape

        table = Table(title="lisa_kit plugins")
        for header in headers:
            table.add_column(header, overflow="fold")  # never hide part of an error
        for row in rows:
            status = row[3]
            style = "green" if status == "ok" else ("red" if status.startswith("FAILED") else "yellow")
            table.add_row(*(escape(c) for c in row[:3]), f"[{style}]{escape(status)}[/{style}]", escape(row[4]))
        # Piped output would otherwise be squeezed to 80 columns.
        console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200)
        with console.capture() as captured:  # rich would turn a closed pipe into exit 1 itself
            console.print(table)
        sys.stdout.write(captured.get())
    if not plugins:
        print("no plugins found in the 'lisa_kit' entry-point group")
    if args.verbose:
        for p in plugins:
            if p.traceback:
                print(f"\n--- {p.describe()} ---\n{p.traceback}", end="")
    return 0


# -- validate -------------------------------------------------------------------
def _setup_validate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe name or path to a .yaml file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every recipe (repeatable): key=value, ~key")
    parser.add_argument("--strict", action="store_true",
                        help="also fail on ??? values still to be set (e.g. weights.path of a shipped recipe); "
                             "by default they are listed as warnings")
    parser.add_argument("--allow-missing", action="store_true",
                        help="the default (??? values are warnings); kept so that existing scripts keep working")


def _run_validate(args: argparse.Namespace) -> int:
    from lisa_kit import recipes
    from lisa_kit import registry as _registry

    registry = _registry.get_registry()
    failed = 0
    for name in args.recipes:
        try:
            recipe = recipes.load_recipe(name, args.overrides)
            problems = recipes.validate_recipe(recipe, registry, allow_missing=not args.strict)
        except LisaKitError as exc:  # cannot even load it: a failed recipe, not a usage error
            recipe, problems = None, [str(exc)]
        label = recipe.path if recipe is not None else name
        print(f"{'FAIL' if problems else 'OK'} {label}")
        for problem in problems:
            print(f"  {problem}")
        if recipe is not None and not args.strict:
            for key in recipes.missing_keys(recipe):
                print(f"  warning: {recipe.source_of(key)}: {key}: value is missing (???)")
        failed += bool(problems)
    return 1 if failed else 0


# -- recipe ---------------------------------------------------------------------
def _setup_recipe_show(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", metavar="RECIPE", help="recipe name or path to a .yaml file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides: key=value, ~key")


def _run_recipe_show(args: argparse.Namespace) -> int:
    from lisa_kit import recipes

    sys.stdout.write(recipes.resolved_yaml(recipes.load_recipe(args.recipe, args.overrides)))
    return 0


def _run_recipe_list(args: argparse.Namespace) -> int:
    from lisa_kit import recipes

    found = recipes.list_recipes()
    for name, path in found.items():
        print(f"{name}\t{path}")
    if not found:
        print("no recipes found in: " + ", ".join(str(d) for d in recipes.recipe_dirs()), file=sys.stderr)
    return 0


add_subcommand(
    "plugins", "list installed plugins and their components", _setup_plugins, _run_plugins,
    description="List every plugin of the 'lisa_kit' entry-point group: distribution, version, "
                "status (ok / FAILED: error / skipped) and the components it provides as kind:name.\n"
                "Set LISA_KIT_DISABLE_PLUGIN_AUTOLOAD=1 to load only lisa-kit's own plugins.",
    epilog="examples:\n  lisa-kit plugins\n  lisa-kit plugins --json | jq '.[] | select(.status != \"ok\")'",
)
add_subcommand(
    "validate", "check recipes against the registered components", _setup_validate, _run_validate,
    description="Load each recipe (following base: and applying --set overrides) and check it "
                "without building anything: all components named and registered, build arguments "
                "known and of the right type, no ??? values left, and written sizes (e.g. "
                "model.projector.in_dim) equal to what the connected components give, read from their "
                "configs; the generation, conversation, data and train sections by type and choice. "
                "Values still to be set (???, e.g. the checkpoint paths of a shipped recipe) are "
                "warnings: they depend on the machine, not on the recipe; --strict makes them failures "
                "(e.g. before launching a job). Exit code 1 if any recipe fails.",
    epilog="examples:\n  lisa-kit validate lisa-7b\n"
           "  lisa-kit validate recipes/*.yaml\n"
           "  lisa-kit validate my-run.yaml --strict\n"
           "  lisa-kit validate lisa-7b --set model.llm.pretrained=/ckpt/llm --set weights.path=/ckpt",
)
add_command_group("recipe", "inspect recipes", description="Inspect recipes (show, list).")
add_subcommand(
    "recipe show", "print a recipe fully resolved", _setup_recipe_show, _run_recipe_show,
    description="Print the recipe after following base: and applying the overrides, "
                "with interpolations resolved (missing values print as ???).",
    epilog="examples:\n  lisa-kit recipe show lisa-7b\n"
           "  lisa-kit recipe show my.yaml model.projector.name=mlp2 ~weights",
)
add_subcommand(
    "recipe list", "list recipes found in the recipe directories", None, _run_recipe_list,
    description="List recipe names found in $LISA_KIT_RECIPE_PATH and the repository's recipes/ directory.",
)

from lisa_kit.cli import data as _data  # noqa: E402,F401  (registers the data commands)

from lisa_kit.cli import eval as _eval  # noqa: E402,F401
from lisa_kit.cli import bench as _bench  # noqa: E402,F401
from lisa_kit.cli import segment as _segment  # noqa: E402,F401
from lisa_kit.cli import export as _export  # noqa: E402,F401
from lisa_kit.cli import train as _train  # noqa: E402,F401
from lisa_kit.cli import demo as _demo  # noqa: E402,F401
from lisa_kit.cli import compare as _compare  # noqa: E402,F401
