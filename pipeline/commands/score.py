"""`wclip score` (placeholder until its issue lands)."""

HELP = "score: not implemented yet"


def add_arguments(parser):
    parser.add_argument("rest", nargs="*")


def run(args):
    print("wclip score is not implemented yet in this version.")
    return 1
