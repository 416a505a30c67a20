"""`wclip card`: a dataset card (README.md with a YAML header, PNG plots, card.json) for scores."""

HELP = "write a dataset card (README.md, plots, card.json) for a scores folder"


def add_arguments(p):
    p.add_argument("--scores", required=True,
                   help="folder of score files from `wclip score` (or the kept/ folder of `wclip filter`)")
    p.add_argument("--stats", required=True, help="the stats file the scores were computed with")
    p.add_argument("--output", required=True, help="card folder (local)")
    p.add_argument("--filter", dest="filter_dir", metavar="FILTER_OUTPUT",
                   help="output folder of `wclip filter`: describe the filter it applied")
    p.add_argument("--input", nargs="+", metavar="SHARDS",
                   help="where to read thumbnails (matched by shard name), when the shard URLs "
                        "recorded in the scores are not reachable from here")
    p.add_argument("--extremes", type=int, default=8, help="images in each least / most likely strip")
    p.add_argument("--no-thumbnails", action="store_true", help="do not read images from the shards")
    p.add_argument("--quantile-error", type=float, default=0.001,
                   help="relative error of the streaming quantiles")


def run(args):
    import sys

    from pipeline.card.build import build_card
    from pipeline.config import CardConfig
    from pipeline.errors import UserError

    try:
        inputs = ()
        if args.input:
            from pipeline.flow.read import expand_shards

            inputs = tuple(expand_shards(args.input))
        cfg = CardConfig(scores=args.scores, stats=args.stats, output=args.output,
                         filter_dir=args.filter_dir, inputs=inputs, extremes=args.extremes,
                         rel_err=args.quantile_error, thumbnails=not args.no_thumbnails)
        card = build_card(cfg)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from exc
    print(f"card for {card['rows']} rows -> {args.output}/README.md "
          f"({len(card['plots'])} plots)", file=sys.stderr)
    for note in card["notes"]:
        print(f"  note: {note}", file=sys.stderr)
    return 0
