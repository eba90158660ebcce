"""`python -m hypervisor serve ...`: run the hypervisor (the same `serve` as `xensim serve`)."""

import argparse
import sys

from hypervisor.server.config import add_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hypervisor", description="The xensim hypervisor: a gRPC server playing Xen.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the Hypercalls and Toolstack services")
    add_arguments(serve)
    args = parser.parse_args(argv)
    from hypervisor.server.app import run

    return run(args, serve)


if __name__ == "__main__":
    sys.exit(main())
