"""`wclip demo`: offline end-to-end run on the built-in model."""

from pipeline.config import EXECUTORS
from pipeline.demo import CLUSTERS

HELP = "offline end-to-end demo: generate a world, fit, score, card, and report AUROCs (no network)"


def add_arguments(p):
    p.add_argument("--workdir", default="wclip-demo", help="folder for the demo's data and outputs")
    p.add_argument("--reference-samples", type=int, default=4000, help="clean reference samples")
    p.add_argument("--target-samples", type=int, default=2000, help="target samples (with anomalies)")
    p.add_argument("--anomaly-rate", type=float, default=0.3, help="fraction of labelled anomalies in the target")
    p.add_argument("--seed", type=int, default=7, help="seed of the generated world")
    p.add_argument("--clusters", type=int, default=CLUSTERS,
                   help="clusters K of the local likelihood (as wclip fit --clusters)")
    p.add_argument("--num-cpus", type=int, help="CPUs to use (default: all)")
    p.add_argument("--executor", choices=EXECUTORS, default="auto",
                   help="local: worker processes of this machine, no Ray; ray: a private local Ray (as on a "
                        "cluster); auto: local unless a GPU or RAY_ADDRESS is there")
    p.add_argument("--no-card", action="store_true", help="skip the dataset card")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")


def run(args):
    import json

    from pipeline.demo.run import LOCAL_TARGET_AUROC, TARGET_AUROC, DemoConfig, report, run_demo, shortfalls
    from pipeline.errors import UserError

    if args.reference_samples < 100 or args.target_samples < 50:
        raise UserError("use at least 100 reference and 50 target samples")
    if not 1 <= args.clusters <= args.reference_samples // 2:
        raise UserError(f"--clusters must be between 1 and half the reference samples "
                        f"({args.reference_samples // 2}); got {args.clusters}")
    ref_shards = 4 if args.reference_samples >= 400 else 1
    tgt_shards = 2 if args.target_samples >= 200 else 1
    cfg = DemoConfig(workdir=args.workdir, reference_shards=ref_shards,
                     reference_per_shard=args.reference_samples // ref_shards, target_shards=tgt_shards,
                     target_per_shard=args.target_samples // tgt_shards, anomaly_rate=args.anomaly_rate,
                     seed=args.seed, clusters=args.clusters, num_cpus=args.num_cpus,
                     progress=False if args.no_progress else None,
                     card=not args.no_card, executor=args.executor)
    summary = run_demo(cfg)
    print(report(summary))
    failing, local = shortfalls(summary)
    if failing:
        print(f"note: AUROC below {TARGET_AUROC} for {json.dumps(failing)}")
    if local:
        print(f"note: local AUROC below {LOCAL_TARGET_AUROC} for {json.dumps(local)}")
    return 0
