"""`wclip filter` (placeholder until its issue lands)."""

HELP = "filter: not implemented yet"


def add_arguments(parser):
    parser.add_argument("rest", nargs="*")


def run(args):
    print("wclip filter is not implemented yet in this version.")
    return 1
