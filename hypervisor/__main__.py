"""`python -m hypervisor serve ...`: run the hypervisor (the same `serve` as `xensim serve`)."""

import sys

from hypervisor.server.config import add_arguments
from xensim.errors import Parser, run_program


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m hypervisor", description="The xensim hypervisor: a gRPC server playing Xen.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the Hypercalls and Toolstack services")
    add_arguments(serve)
    args = parser.parse_args(argv)

    def body() -> int:
        from hypervisor.server.app import run

        return run(args, serve)

    return run_program("python -m hypervisor serve", body)


if __name__ == "__main__":
    sys.exit(main())
