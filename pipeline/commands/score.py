"""`wclip score`: per-sample likelihood columns, one Parquet file per input shard."""

from pipeline.commands import _common

HELP = "score shards with fitted whitening statistics; writes DIR/<shard>.parquet (resumable)"


def add_arguments(p):
    _common.add_input_arguments(p)
    p.add_argument("--stats", required=True, help="stats file from `wclip fit`")
    p.add_argument("--output", required=True, help="output folder (local or fsspec URL)")
    _common.add_model_arguments(p, required=False)
    g = p.add_argument_group("score")
    g.add_argument("--overwrite", action="store_true", help="redo shards that are already complete")
    g.add_argument("--save-embeddings", action="store_true",
                   help="also write row-aligned embeddings per shard (<shard>.embeddings.safetensors)")
    norm = g.add_mutually_exclusive_group()
    norm.add_argument("--normalize", action="store_true", default=None,
                      help="L2-normalised embeddings (must match the fit; default: the fit's choice)")
    norm.add_argument("--raw", action="store_true", default=None, help="raw embeddings (must match the fit)")
    _common.add_run_arguments(p)


def run(args):
    from pipeline.config import ScoreConfig
    from pipeline.errors import UserError
    from pipeline.score import score
    from pipeline.whitening import StatsFile

    if "://" in args.stats:
        raise UserError(f"--stats {args.stats}: give a local stats file (copy it first), or run "
                        f"`python -m jobs.score`, which downloads it")
    try:
        stats = StatsFile.load(args.stats)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    spec = _common.model_spec(args, default=stats.metadata)
    if args.normalize:
        normalize = True
    elif args.raw:
        normalize = False
    else:
        normalize = bool(stats.metadata.get("normalize"))
    try:
        cfg = ScoreConfig(run=_common.run_config(args, spec, normalize=normalize), stats_path=args.stats,
                          output=args.output, overwrite=args.overwrite, save_embeddings=args.save_embeddings)
        summary = score(cfg, stats)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    return _common.print_summary(f"score -> {args.output}", summary)
