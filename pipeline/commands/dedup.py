"""`wclip dedup`: near-duplicate groups of a scores folder's rows, and the one row each keeps, in a folder of
its own (pipeline.runs.dedup); `wclip filter --dedup DIR` then keeps the kept rows only."""

from pipeline.commands._common import add_task_arguments
from pipeline.config import DEDUP_BLOCK, DEDUP_CLUSTER_ROWS, DEDUP_CLUSTERS, EMBEDDING_KEYS

HELP = "find near-duplicate rows (cosine >= 1 - eps within a cluster) and keep one per group by a rule"

EPILOG = """\
Within each cluster every pair of rows whose embeddings have cosine >= 1 - eps is a duplicate pair (SemDeDup);
pairs join into groups, and each group keeps one row by --keep:
  COLUMN[:highest|:lowest]   a score column: clip_score, image_loglik, image_local_loglik, ... (default
                             direction: highest; lowest for *_sqnorm)
  centroid:nearest|farthest  the row nearest to / farthest from its cluster's centroid (SemDeDup)
  random                     by a hash of the key seeded with --seed
Ties are broken by (key, shard, index). Rows with status other than "ok" or without an embedding are not
compared: their cluster and group are empty and they are kept.

Clusters (--clusters): auto uses the scores' image_cluster (stats fitted with --clusters K) when present, else
an own spherical k-means with K = ceil(rows / --cluster-rows), found on --cluster-sample rows (those with the
smallest key hashes). Pairs across clusters are not compared (SemDeDup's approximation).

outputs in OUTPUT/: <name>.parquet per score file (key, shard, index, cluster, dup_group, dup_size, kept;
dup_group is the position of the group's kept row, counting rows over the score files in name order),
and beside it OUTPUT.wclip/dedup.json (settings, the scores' identity, the summary). Rerun the same command to resume.

example:
  wclip score --input 'data/{00000..00127}.tar' --stats stats.safetensors --output scores/ --save-embeddings
  wclip dedup --scores scores/ --output dedup/ --eps 0.05 --keep clip_score:highest
  wclip filter --scores scores/ --dedup dedup/ --keep-fraction clip_score=0.5 --output keep/
"""


def add_arguments(p):
    from pipeline.commands import DescribedHelpFormatter

    p.formatter_class = DescribedHelpFormatter
    p.epilog = EPILOG
    p.add_argument("--scores", required=True, help="scores folder from `wclip score`")
    p.add_argument("--output", required=True, help="dedup folder (its own; score files are never rewritten)")
    g = p.add_argument_group("dedup")
    g.add_argument("--eps", type=float, default=0.05, help="duplicates have cosine >= 1 - eps")
    g.add_argument("--keep", default="clip_score:highest", metavar="RULE", help="which row of a group is kept")
    g.add_argument("--seed", type=int, default=0, help="seed of the k-means and of --keep random")
    g.add_argument("--embeddings", nargs="+", metavar="PATH",
                   help="the embeddings that were scored (clip-retrieval folders, DataComp .npz); default: the "
                        "scores folder's own (`wclip score --save-embeddings`)")
    g.add_argument("--embedding-key", choices=EMBEDDING_KEYS, help="DataComp .npz: which model's arrays")
    g.add_argument("--tower", choices=("image", "text"), default="image", help="whose embeddings are compared")
    g.add_argument("--clusters", choices=DEDUP_CLUSTERS, default="auto", help="where the clusters come from")
    g.add_argument("--cluster-rows", type=int, default=DEDUP_CLUSTER_ROWS,
                   help="own k-means: rows per cluster on average (K = ceil(rows / this))")
    g.add_argument("--block", type=int, default=DEDUP_BLOCK, help="rows per side of one block product")
    g.add_argument("--device", default="cpu", help="torch device of the pair search: cpu, cuda, cuda:1")
    g.add_argument("--overwrite", action="store_true", help="redo a dedup folder made with other settings")
    add_task_arguments(p, "task")


def _config(args):
    from pipeline.config import DedupConfig, RayOptions

    return DedupConfig(
        scores=args.scores, output=args.output, keep=args.keep, eps=args.eps, embeddings=tuple(args.embeddings or ()),
        embedding_key=args.embedding_key, tower=args.tower, clusters=args.clusters, cluster_rows=args.cluster_rows,
        seed=args.seed, block=args.block, device=_device(args.device), overwrite=args.overwrite,
        ray=RayOptions(address=args.address, num_cpus=args.num_cpus), max_in_flight=args.max_in_flight,
        retries=args.retries, progress=False if args.no_progress else None, executor=args.executor)


def _device(name: str) -> str:
    from pipeline.errors import ConfigError

    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: this machine has no CUDA device; use --device cpu")
    return name


def run(args):
    import json
    import sys

    from pipeline.errors import UserError
    from pipeline.runs.dedup import dedup

    try:
        summary = dedup(_config(args))
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from exc
    print(f"dedup: {summary['compared']} of {summary['rows']} rows compared in {summary['clusters']} clusters; "
          f"{summary['groups']} duplicate groups holding {summary['duplicates']} rows; {summary['removed']} rows "
          f"removed ({summary['keep']} kept); {len(summary['failed'])} failed", file=sys.stderr)
    print(json.dumps(summary))
    return 1 if summary["failed"] else 0
