"""The ``opbridge`` command. Each subcommand lives with the feature it drives and is imported only when used."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# name -> (module, help). A module provides add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "info": ("opbridge.core.info_cli", "devices, backend availability and where each op goes"),
    "conformance": ("opbridge.conformance.cli", "check a backend against OPS.md, op by op (the main job)"),
    "bench": ("opbridge.conformance.bench_cli", "time each op against its peers and the device ceilings"),
    "export": ("opbridge.onnx.cli", "export a module that calls opbridge ops to ONNX"),
    "port-check": ("opbridge.integrations.port_check", "run a transformers DeepSeek model patched vs unpatched"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="opbridge", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.parse_args(argv)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    name = argv[0]
    module_name, help_ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        print(f"opbridge {name}: not available in this installation ({e})", file=sys.stderr)
        return 2
    sp = argparse.ArgumentParser(prog=f"opbridge {name}", description=help_)
    module.add_arguments(sp)
    return int(module.run(sp.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
