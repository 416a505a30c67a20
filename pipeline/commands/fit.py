"""`wclip fit` (placeholder until its issue lands)."""

HELP = "fit: not implemented yet"


def add_arguments(parser):
    parser.add_argument("rest", nargs="*")


def run(args):
    print("wclip fit is not implemented yet in this version.")
    return 1
