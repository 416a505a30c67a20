"""`wclip train-demo`: retrain the shipped wclip-demo model on the synthetic world."""

HELP = "train-demo: retrain the built-in wclip-demo CLIP on the synthetic world and evaluate it"


def add_arguments(parser):
    import argparse

    from pipeline.demo.train import NORM_WEIGHT, SPLICE_KEEP, SPLICE_RATE, WARM_START_STEPS, WEIGHTS_PATH

    parser.add_argument("--steps", type=int, default=300, help="optimiser steps (batch of --batch-size pairs)")
    parser.add_argument("--seed", type=int, default=0, help="seeds model init and the training world")
    parser.add_argument("--output", default=str(WEIGHTS_PATH),
                        help="weights file (.safetensors); the training record goes beside it as .train.json")
    parser.add_argument("--batch-size", type=int, default=256, help="pairs per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (cosine schedule)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--select-every", type=int, default=25,
                        help="score a labelled validation world every N steps from --select-from on and keep "
                             "the best checkpoint (0: keep the last)")
    parser.add_argument("--select-from", type=int, default=100, help="first step considered for selection")
    parser.add_argument("--warm-start", default=",".join(map(str, WARM_START_STEPS)), metavar="CONCEPTS,ALL",
                        help="supervised image-tower steps before CLIP: on shapes and colours (each on its own "
                             "embedding coordinate), then on every labelled attribute (0,0 skips it)")
    parser.add_argument("--concept-weight", type=float, default=0.3,
                        help="weight, during CLIP, of the loss that keeps each shape and colour on its own "
                             "embedding coordinate (0: off)")
    parser.add_argument("--splice-rate", type=float, default=SPLICE_RATE,
                        help="share of the warm start's second stage made of spliced scenes (one scene's top above "
                             "another's bottom) that teach the background at the top and bottom edge (0: off)")
    parser.add_argument("--splice-keep", type=int, default=SPLICE_KEEP,
                        help="spliced scenes per CLIP step that keep the edge backgrounds readable (0: none)")
    parser.add_argument("--norm-weight", type=float, default=NORM_WEIGHT,
                        help="weight, during CLIP, of the variance of the image embeddings' log-norm: keeps the raw "
                             "(unnormalised) embeddings that whitening reads free of a spread of norms (0: off)")
    parser.add_argument("--shape-negatives", action=argparse.BooleanOptionalAction, default=True,
                        help="add a shape-swapped hard-negative caption per pair (on in the shipped model)")
    parser.add_argument("--twins", type=float, default=0.0,
                        help="share of each batch made of minimal pairs differing only in shape "
                             "(0 in the shipped model)")
    parser.add_argument("--eval-samples", type=int, default=4000,
                        help="reference and target pairs for the held-out test evaluation (0 skips it)")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="no training: evaluate the weights at --output again (--eval-samples, --threads) and "
                             "rewrite the evaluation in the .train.json beside them")


def run(args):
    import json

    from pipeline.demo.train import WARM_START_STEPS, main
    from pipeline.errors import UserError

    if args.evaluate_only:
        return _evaluate_only(args)
    if args.steps < 1 or args.batch_size < 2 or args.threads < 1 or min(args.eval_samples, args.select_every) < 0:
        raise UserError(f"need --steps >= 1, --batch-size >= 2, --threads >= 1, --eval-samples >= 0, "
                        f"--select-every >= 0 (got {args.steps}, {args.batch_size}, {args.threads}, "
                        f"{args.eval_samples}, {args.select_every})")
    if not 0.0 <= args.twins <= 1.0:
        raise UserError(f"--twins must be between 0 and 1 (got {args.twins})")
    try:
        warm_start = tuple(int(v) for v in args.warm_start.split(","))
    except ValueError:
        warm_start = ()
    if len(warm_start) != 2 or min(warm_start) < 0:
        raise UserError(f"--warm-start takes two step counts >= 0, CONCEPTS,ALL such as "
                        f"{','.join(map(str, WARM_START_STEPS))} (got {args.warm_start!r})")
    if args.concept_weight < 0:
        raise UserError(f"--concept-weight must be >= 0 (got {args.concept_weight})")
    if not 0.0 <= args.splice_rate <= 1.0 or args.splice_keep < 0 or args.norm_weight < 0:
        raise UserError(f"need --splice-rate between 0 and 1, --splice-keep >= 0 and --norm-weight >= 0 "
                        f"(got {args.splice_rate}, {args.splice_keep}, {args.norm_weight})")
    if not args.output.endswith(".safetensors"):
        raise UserError(f"--output must end with .safetensors (got {args.output})")
    record = main(steps=args.steps, seed=args.seed, output=args.output, eval_samples=args.eval_samples,
                  batch_size=args.batch_size, lr=args.lr, threads=args.threads, select_every=args.select_every,
                  select_from=args.select_from, shape_negatives_too=args.shape_negatives, twins=args.twins,
                  warm_start_steps=warm_start, concept_weight=args.concept_weight,
                  splice_rate=args.splice_rate, splice_keep=args.splice_keep, norm_weight=args.norm_weight)
    print(f"wrote {args.output} ({record['weights_bytes'] / 1e6:.1f} MB) after {record['train_seconds']}s, "
          f"final loss {record['final_loss']}")
    if "eval" in record:
        print(json.dumps(record["eval"], indent=2))
    return 0


def _evaluate_only(args):
    import json
    from pathlib import Path

    from pipeline.demo.train import record_path, reevaluate
    from pipeline.errors import UserError

    if args.eval_samples < 100 or args.threads < 1:
        raise UserError(f"--evaluate-only needs --eval-samples >= 100 and --threads >= 1 "
                        f"(got {args.eval_samples}, {args.threads})")
    for path in (Path(args.output), record_path(args.output)):
        if not path.is_file():
            raise UserError(f"--evaluate-only: {path} does not exist; train first with `wclip train-demo`")
    record = reevaluate(args.output, eval_samples=args.eval_samples, threads=args.threads)
    print(json.dumps(record["eval"], indent=2))
    print(f"rewrote the evaluation in {record_path(args.output)}")
    return 0
