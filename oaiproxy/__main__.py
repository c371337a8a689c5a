# -*- test-case-name: tests.test_clients -*-
"""
C{python -m oaiproxy}: helper commands beside the daemon (which runs as
C{twistd oaiproxy}).

    python -m oaiproxy keygen --name alice [--models gpt-4o,gpt-4o-mini]

mints a client key, shows it once on standard error, and prints the
keys-file entry (its hash, never the key) on standard output, so that
C{>> clients.toml} appends the entry without the key ever touching the
file.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, TextIO

from oaiproxy.clients import file_entry, mint_key

__all__ = ["main"]


def main(argv: Optional[list[str]] = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    parser = argparse.ArgumentParser(prog="python -m oaiproxy", description="oaiproxy helper commands")
    commands = parser.add_subparsers(dest="command", required=True)
    keygen = commands.add_parser("keygen", help="mint a client key and print its keys-file entry")
    keygen.add_argument("--name", required=True, help="the client's name, as logs will show it")
    keygen.add_argument("--models", help="comma-separated model allow-list (default: any model)")
    args = parser.parse_args(argv)

    name = args.name.strip()
    if not name:
        parser.error("--name must not be empty")
    models = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    key = mint_key()
    err.write(
        f"Client key for {name} (shown once; give it to the client, store it nowhere else):\n\n    {key}\n\n"
        "Keys-file entry (append it to the file given to --client-keys-file, then reload):\n"
    )
    err.flush()
    out.write(file_entry(name, key, models))
    return 0


if __name__ == "__main__":
    sys.exit(main())
