"""`wclip fit`: whitening statistics of a reference corpus."""

from pipeline.commands import _common

HELP = "fit whitening statistics (mean, whitening matrix, calibration) on reference shards"


def _components(value: str):
    if value in ("auto", "all", "none", "None"):
        return "auto" if value == "auto" else None
    return int(value)


def add_arguments(p):
    _common.add_input_arguments(p)
    p.add_argument("--output", required=True, help="stats file to write (.safetensors)")
    _common.add_model_arguments(p, required=True)
    g = p.add_argument_group("fit")
    g.add_argument("--components", type=_components, default="auto",
                   help="kept components m: an integer, 'all', or 'auto' (held-out sqnorm/m close to 1)")
    g.add_argument("--shrinkage", type=float, default=0.0, help="covariance shrinkage a: S + a*trace(S)/d*I")
    g.add_argument("--holdout", type=float, default=0.1, help="fraction held out (by key hash) for calibration")
    g.add_argument("--max-samples", type=int, help="cap on reference samples (first shards first)")
    g.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    norm = g.add_mutually_exclusive_group()
    norm.add_argument("--normalize", action="store_true", help="L2-normalise embeddings before fitting")
    norm.add_argument("--raw", action="store_true", help="raw embeddings, as the paper (default)")
    _common.add_run_arguments(p)


def run(args):
    from pipeline.config import FitConfig
    from pipeline.errors import UserError
    from pipeline.fit import fit

    if "://" in args.output:
        raise UserError(f"--output {args.output}: `wclip fit` writes the stats file locally; give a local path "
                        f"and copy it, or run `python -m jobs.fit`, which uploads it")
    spec = _common.model_spec(args)
    try:
        cfg = FitConfig(run=_common.run_config(args, spec, normalize=args.normalize), output=args.output,
                        components=args.components, shrinkage=args.shrinkage, holdout=args.holdout,
                        max_samples=args.max_samples, seed=args.seed)
        summary = fit(cfg)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    return _common.print_summary(f"fit -> {args.output}", summary)
