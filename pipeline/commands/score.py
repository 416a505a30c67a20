"""`wclip score`: per-sample likelihood columns, one Parquet file per input shard (or embedding file)."""

from pipeline.commands import _common
from pipeline.whitening.kernels import BACKENDS

HELP = "score shards or precomputed embeddings with fitted whitening statistics; writes DIR/<name>.parquet (resumable)"


def add_arguments(p):
    _common.add_input_arguments(p)
    _common.add_embedding_arguments(p)
    p.add_argument("--stats", required=True, help="stats file from `wclip fit`")
    p.add_argument("--output", required=True, help="output folder (local or fsspec URL)")
    _common.add_model_arguments(p, required=False)
    g = p.add_argument_group("score")
    g.add_argument("--overwrite", action="store_true", help="redo shards that are already complete")
    g.add_argument("--save-embeddings", action="store_true",
                   help="also write the embeddings, row-aligned with the scores, in clip-retrieval's layout under "
                        "DIR.wclip/embeddings/ beside DIR (img_emb/img_emb_N.npy, text_emb/text_emb_N.npy, "
                        "metadata/metadata_N.parquet; N = the shard's name when it is a number), float32")
    g.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="--embeddings: how blocks are whitened and scored (auto: NumPy on the CPU, the tar path's "
                        "fused CUDA kernel or torch on --device cuda; torch: float64 torch on --device, the CPU "
                        "included). With --embeddings, --device defaults to the CPU and cuda scores on the GPU")
    norm = g.add_mutually_exclusive_group()
    norm.add_argument("--normalize", action="store_true", default=None,
                      help="L2-normalised embeddings (must match the fit; default: the fit's choice)")
    norm.add_argument("--raw", action="store_true", default=None, help="raw embeddings (must match the fit)")
    _common.add_run_arguments(p)


def run(args):
    from pipeline.errors import UserError
    from pipeline.whitening import StatsFile

    if "://" in args.stats:
        raise UserError(f"--stats {args.stats}: give a local stats file (copy it first), or run "
                        f"`python -m jobs.score`, which downloads it")
    embeddings = _common.uses_embeddings(args)
    try:
        stats = StatsFile.load(args.stats)
        summary = _score_embeddings(args, stats) if embeddings else _score_shards(args, stats)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if summary.get("dry_run"):
        return _common.print_plan(f"score -> {args.output}", summary)
    return _common.print_summary(f"score -> {args.output}", summary)


def _score_shards(args, stats) -> dict:
    from pipeline.config import ScoreConfig
    from pipeline.errors import UserError
    from pipeline.runs.score import score
    from pipeline.sources.tars import refuse_embedding_stats

    if args.backend != "auto":
        raise UserError(f"--backend {args.backend} applies to --embeddings; the encoders of --input pick theirs "
                        f"(the fused kernel on CUDA, else torch)")
    refuse_embedding_stats(stats.metadata)
    spec = _common.model_spec(args, default=stats.metadata)
    if args.normalize:
        normalize = True
    elif args.raw:
        normalize = False
    else:
        normalize = bool(stats.metadata.get("normalize"))
    cfg = ScoreConfig(run=_common.run_config(args, spec, normalize=normalize), stats_path=args.stats,
                      output=args.output, overwrite=args.overwrite, save_embeddings=args.save_embeddings)
    return score(cfg, stats, dry_run=args.dry_run)


def _score_embeddings(args, stats) -> dict:
    from pipeline.config import EmbeddingScoreConfig
    from pipeline.errors import UserError
    from pipeline.runs.score import score

    given = [f for f, v in (("--model", args.model), ("--pretrained", args.pretrained),
                            ("--checkpoint", args.checkpoint), ("--random-init", args.random_init),
                            ("--normalize", args.normalize), ("--raw", args.raw)) if v]
    if given or args.save_embeddings:
        raise UserError(f"{(given or ['--save-embeddings'])[0]} does not apply to --embeddings: precomputed "
                        f"embeddings are scored as they are, with no model (and are saved already)")
    cfg = EmbeddingScoreConfig(run=_common.embedding_run_config(args), stats_path=args.stats, output=args.output,
                               overwrite=args.overwrite)
    return score(cfg, stats, dry_run=args.dry_run)
