"""`wclip card` (placeholder until its issue lands)."""

HELP = "card: not implemented yet"


def add_arguments(parser):
    parser.add_argument("rest", nargs="*")


def run(args):
    print("wclip card is not implemented yet in this version.")
    return 1
