"""The ``diffloom`` command: a thin shell over the registry.

The core provides ``plugins``, ``pipelines``, ``schedulers`` and ``models``; every other sub-command arrives
through the ``register_commands`` hook, as a third-party command would. Listing never imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys

from .registry import RegistryError, registry


class UsageError(Exception):
    """A command-line mistake: reported in one line, exit code 2."""


def _plugins_command(parser):
    parser.add_argument("--all", action="store_true", help="include the plugins built into diffloom")

    def run(args):
        print(json.dumps(registry.plugins(include_builtin=args.all), indent=2))

    return run


def _listing_command(kind):
    def command(parser):
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")

        def run(args):
            rows = [{"name": e.name, "plugin": e.provider,
                     "target": e.target if isinstance(e.target, str) else f"{e.target.__module__}:{e.name}",
                     **({"overrides": e.overrides} if e.overrides else {})}
                    for e in registry.entries(kind)]
            if args.json:
                print(json.dumps(rows, indent=2))
                return
            width = max([len(r["name"]) for r in rows] + [4])
            for r in rows:
                print(f"{r['name']:<{width}}  {r['plugin']}")

        return run

    return command


_CORE_COMMANDS = {
    "plugins": (_plugins_command, "installed plugins, what each provides, what failed to load (JSON)"),
    "pipelines": (_listing_command("pipeline"), "registered pipeline classes"),
    "schedulers": (_listing_command("scheduler"), "registered scheduler classes"),
    "models": (_listing_command("model"), "registered model classes"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffloom", description="diffusion pipelines, made of plugins")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    runners = {}
    commands = {name: (factory, help_) for name, (factory, help_) in _CORE_COMMANDS.items()}
    for entry in registry.entries("command"):
        if entry.name in commands:
            continue
        commands[entry.name] = (entry, entry.meta.get("help", ""))
    for name, (factory, help_) in commands.items():
        sub_parser = sub.add_parser(name, help=help_, description=help_)
        runners[name] = (factory, sub_parser)
    parser.set_defaults(_runners=runners)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        parser.print_help()
        return 0
    # Only the chosen command's module is imported, so `diffloom plugins` stays light.
    name = argv[0]
    runners = parser.get_default("_runners")
    if name not in runners:
        parser.parse_args(argv)  # prints argparse's own error and exits 2
        return 2
    factory, sub_parser = runners[name]
    if not callable(factory):
        try:
            factory = factory.load()
        except RegistryError as e:
            print(f"diffloom {name}: {e}", file=sys.stderr)
            return 2
    run = factory(sub_parser)
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except UsageError as e:
        print(f"diffloom {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffloom {name}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)

