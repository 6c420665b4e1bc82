"""Entry point of the ``pyrovae`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from pyrovae import __version__
from pyrovae.context import flush_denormals_in_every_thread
from pyrovae.errors import Interrupted, PyrovaeError

from . import compare, evaluate, interpolate, latents, list as list_command, reconstruct, sample, train
from .common import in_flags

COMMANDS = (train, sample, reconstruct, interpolate, evaluate, compare, latents, list_command)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage mistake answered in one line (and exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="pyrovae",
        description="Variational autoencoders as Pyro programs: train with SVI, draw pictures, estimate the evidence.",
    )
    p.add_argument("--version", action="version", version=f"pyrovae {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except PyrovaeError as e:
        message = in_flags(" ".join(str(e).split()))  # one line, whatever the message holds, in the options' words
        print(f"pyrovae {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"pyrovae {args.command}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"pyrovae {args.command}: interrupted", file=sys.stderr)
        return 130


def run() -> int:
    """The ``pyrovae`` program: :func:`main` in a process whose every thread flushes denormal floats."""
    flush_denormals_in_every_thread()  # before torch starts its threads, which inherit the flag
    return main()


if __name__ == "__main__":
    sys.exit(run())
