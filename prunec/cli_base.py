"""What every command-line module shares: the stderr console and a parser whose errors are one line, exit 2."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from rich.console import Console

console = Console(stderr=True, highlight=False)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"prunec: error: {message}. Run 'prunec --help' for usage.", file=sys.stderr)
        raise SystemExit(2)
