"""`wclip train-demo` (placeholder until its issue lands)."""

HELP = "train-demo: not implemented yet"


def add_arguments(parser):
    parser.add_argument("rest", nargs="*")


def run(args):
    print("wclip train-demo is not implemented yet in this version.")
    return 1
