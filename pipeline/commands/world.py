"""`wclip world`: write a procedurally generated image–caption world as WebDataset shards."""

HELP = "world: generate a labelled synthetic image-caption corpus (img2dataset layout)"


def add_arguments(parser):
    parser.add_argument("--output", required=True, help="folder for NNNNN.tar, NNNNN.parquet, NNNNN_stats.json")
    parser.add_argument("--shards", type=int, default=1, help="number of tar shards")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="pairs per shard")
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical shards")
    parser.add_argument("--anomaly-rate", type=float, default=0.0, help="fraction of labelled anomalies per shard")
    parser.add_argument("--vocabulary", choices=("reference", "open"), default="reference",
                        help="reference: the corpus anomalies are defined against (4 shapes, 6 colours); "
                             "open: the demo model's pre-training world (every shape and colour, empty scenes)")
    parser.add_argument("--anomalies", default=None,
                        help="comma-separated kinds to inject (default: all): noise, blank, damaged, "
                             "unseen_shape, unseen_colour, gibberish, ungrammatical, mismatch")


def run(args):
    from pipeline.demo.shards import generate_world
    from pipeline.demo.world import ANOMALY_KINDS
    from pipeline.errors import UserError

    kinds = None
    if args.anomalies:
        kinds = [k.strip() for k in args.anomalies.split(",") if k.strip()]
        unknown = [k for k in kinds if k not in ANOMALY_KINDS]
        if unknown:
            raise UserError(f"--anomalies: unknown kind(s) {', '.join(unknown)}; "
                            f"choose from {', '.join(ANOMALY_KINDS)}")
    if args.shards < 1 or args.samples_per_shard < 1:
        raise UserError(f"--shards and --samples-per-shard must be >= 1 "
                        f"(got {args.shards} and {args.samples_per_shard})")
    if not 0.0 <= args.anomaly_rate <= 1.0:
        raise UserError(f"--anomaly-rate must be between 0 and 1 (got {args.anomaly_rate})")
    if args.vocabulary == "open" and args.anomaly_rate > 0:
        raise UserError("--vocabulary open holds no anomalies (they are defined against the reference "
                        "world): drop --anomaly-rate")
    paths = generate_world(args.output, args.shards, args.samples_per_shard, args.seed,
                           anomaly_rate=args.anomaly_rate, anomaly_kinds=kinds, vocabulary=args.vocabulary)
    print(f"wrote {len(paths)} shard(s) x {args.samples_per_shard} samples to {args.output} "
          f"({paths[0].name} .. {paths[-1].name})")
    return 0
