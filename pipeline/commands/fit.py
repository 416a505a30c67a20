"""`wclip fit`: whitening statistics of a reference corpus (tar shards, or precomputed embeddings)."""

from pipeline.commands import _common
from pipeline.config import CLUSTER_SAMPLE, MAX_HELDOUT

HELP = "fit whitening statistics (mean, whitening matrix, calibration) on reference shards or embeddings"


def cluster_count(text: str):
    """``--clusters``: ``auto`` or an integer (checked by the config)."""
    return "auto" if text == "auto" else int(text)


def _components(value: str):
    if value in ("auto", "all", "none", "None"):
        return "auto" if value == "auto" else None
    return int(value)


def add_arguments(p):
    _common.add_input_arguments(p)
    _common.add_embedding_arguments(p)
    p.add_argument("--output", required=True, help="stats file to write (.safetensors)")
    _common.add_model_arguments(p, required=True)
    _common.not_required(p, "model")  # --embeddings needs no model
    g = p.add_argument_group("fit")
    g.add_argument("--components", type=_components, default="auto",
                   help="kept components m: an integer, 'all', or 'auto' (held-out sqnorm/m close to 1)")
    g.add_argument("--shrinkage", type=float, default=0.0, help="covariance shrinkage a: S + a*trace(S)/d*I")
    g.add_argument("--holdout", type=float, default=0.1, help="fraction held out (by key hash) for calibration")
    g.add_argument("--max-samples", type=int,
                   help="cap on reference samples (first shards first; with --embeddings: the first rows read)")
    g.add_argument("--max-heldout", type=int, default=MAX_HELDOUT,
                   help="held-out rows kept for calibration, per tower (those with the smallest key hashes), so "
                        "memory stays bounded whatever the corpus size")
    g.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    g.add_argument("--clusters", type=cluster_count, metavar="K",
                   help="also fit the local likelihood: K clusters of the reference, a Gaussian each (the scores "
                        "gain <tower>_cluster, <tower>_local_loglik and <tower>_local_pvalue), or 'auto': K chosen "
                        "on the held-out rows; default: off")
    g.add_argument("--cluster-sample", type=int, default=CLUSTER_SAMPLE,
                   help="fit rows the clusters are found on (those with the smallest key hashes), per tower")
    norm = g.add_mutually_exclusive_group()
    norm.add_argument("--normalize", action="store_true", help="L2-normalise embeddings before fitting")
    norm.add_argument("--raw", action="store_true", help="raw embeddings, as the paper (default)")
    _common.add_run_arguments(p)


def run(args):
    from pipeline.errors import UserError

    if "://" in args.output:
        raise UserError(f"--output {args.output}: `wclip fit` writes the stats file locally; give a local path "
                        f"and copy it, or run `python -m jobs.fit`, which uploads it")
    embeddings = _common.uses_embeddings(args, needs=("--model",))
    try:
        summary = _fit_embeddings(args) if embeddings else _fit_shards(args)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if summary.get("dry_run"):
        return _common.print_plan(f"fit -> {args.output}", summary)
    if summary.get("not_written"):  # a fit on part of the input is no fit: nothing was written
        return _common.print_summary(f"fit -> {args.output} NOT WRITTEN ({summary['not_written']}: mend or remove "
                                     f"them and rerun)", summary)
    return _common.print_summary(f"fit -> {args.output}", summary)


def _fit_shards(args) -> dict:
    from pipeline.config import FitConfig
    from pipeline.runs.fit import fit

    spec = _common.model_spec(args)
    cfg = FitConfig(run=_common.run_config(args, spec, normalize=args.normalize), output=args.output,
                    components=args.components, shrinkage=args.shrinkage, holdout=args.holdout,
                    max_samples=args.max_samples, max_heldout=args.max_heldout, seed=args.seed,
                    clusters=args.clusters, cluster_sample=args.cluster_sample)
    return fit(cfg, dry_run=args.dry_run)


def _fit_embeddings(args) -> dict:
    from pipeline.config import EmbeddingFitConfig
    from pipeline.errors import UserError
    from pipeline.runs.fit import fit
    given = [f for f, v in (("--model", args.model), ("--pretrained", args.pretrained),
                            ("--checkpoint", args.checkpoint), ("--random-init", args.random_init),
                            ("--normalize", args.normalize), ("--raw", args.raw)) if v]
    if given:
        raise UserError(f"{given[0]} does not apply to --embeddings: precomputed embeddings are fitted as they are, "
                        f"with no model (the stats record whether they are L2-normalised)")
    cfg = EmbeddingFitConfig(run=_common.embedding_run_config(args), output=args.output,
                             components=args.components, shrinkage=args.shrinkage, holdout=args.holdout,
                             max_samples=args.max_samples, max_heldout=args.max_heldout, seed=args.seed,
                             clusters=args.clusters, cluster_sample=args.cluster_sample)
    return fit(cfg, dry_run=args.dry_run)
