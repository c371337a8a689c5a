# -*- test-case-name: tests.test_clients -*-
"""
C{python -m oaiproxy}: helper commands beside the daemon (which runs as
C{twistd oaiproxy}).

    python -m oaiproxy keygen --name alice [--models gpt-4o,gpt-4o-mini]

mints a client key, shows it once on standard error, and prints the
keys-file entry (its hash, never the key) on standard output, so that
C{>> clients.toml} appends the entry without the key ever touching the
file.

    python -m oaiproxy keygen --name alice --stdin < existing-key

hashes a key the client already has instead (a team keeping the keys it
hands out, whatever their prefix), read from standard input (without echo
at a terminal), never from the command line, where C{ps} would show it.

    python -m oaiproxy usage [--db PATH|URL] [--since 7d] [--by client,model] [--format table|csv|json]

reports what the usage ledger holds (see L{oaiproxy.ledger.report}).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Optional, TextIO

from oaiproxy.access.clients import file_entry, mint_key
from oaiproxy.ledger import report
from oaiproxy.upstream.headers import looks_like_openai_key

__all__ = ["main"]


def main(
    argv: Optional[list[str]] = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    stdin: Optional[TextIO] = None,
) -> int:
    parser = argparse.ArgumentParser(prog="python -m oaiproxy", description="oaiproxy helper commands")
    commands = parser.add_subparsers(dest="command", required=True)
    keygen = commands.add_parser(
        "keygen", help="mint a client key (or hash an existing one) and print its keys-file entry"
    )
    keygen.add_argument("--name", required=True, help="the client's name, as logs will show it")
    keygen.add_argument("--models", help="comma-separated model allow-list (default: any model)")
    keygen.add_argument(
        "--stdin",
        action="store_true",
        help="hash a key read from standard input (one line) instead of minting one: keep an existing key",
    )
    usage = commands.add_parser("usage", help="report what the usage ledger holds (tokens and cost)")
    report.add_arguments(usage)
    args = parser.parse_args(argv)
    if args.command == "usage":
        return report.run(args, out, err)

    name = args.name.strip()
    if not name:
        parser.error("--name must not be empty")
    models = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    if args.stdin:
        key = _read_key(stdin if stdin is not None else sys.stdin, err)
        if not key:
            err.write("python -m oaiproxy keygen: error: no key on standard input\n")
            return 2
        if looks_like_openai_key(key.encode("utf-8")):
            # Accepted (a configured key always is), but worth a word.
            err.write(
                "Warning: this is a real OpenAI API key. Clients of the proxy need no OpenAI key; "
                "give them a key of their own (keygen without --stdin).\n"
            )
        err.write("Keys-file entry (append it to the file given to --client-keys-file, then reload):\n")
    else:
        key = mint_key()
        err.write(
            f"Client key for {name} (shown once; give it to the client, store it nowhere else):\n\n    {key}\n\n"
            "Keys-file entry (append it to the file given to --client-keys-file, then reload):\n"
        )
    err.flush()
    out.write(file_entry(name, key, models))
    return 0


def _read_key(stdin: TextIO, err: TextIO) -> str:
    """
    One key from standard input: prompted for without echo at a terminal,
    else its first line.  Surrounding whitespace is dropped, as a client
    sending it would.
    """
    if stdin.isatty():
        return getpass.getpass("Client key (not echoed): ", stream=err).strip()
    return stdin.readline().strip()


if __name__ == "__main__":
    sys.exit(main())
