"""`wclip world` (placeholder until its issue lands)."""

HELP = "world: not implemented yet"


def add_arguments(parser):
    parser.add_argument("rest", nargs="*")


def run(args):
    print("wclip world is not implemented yet in this version.")
    return 1
