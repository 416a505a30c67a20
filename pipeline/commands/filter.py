"""`wclip filter`: keep the rows of a scores folder that pass thresholds; write kept rows,
a DataComp uid list and, with ``--input``, new shards holding exactly the kept samples."""

from pipeline.commands._common import add_task_arguments
from pipeline.config import INPUT_FORMATS

HELP = "select samples by score thresholds or top fractions; writes kept rows, uids.npy, new shards"

EPILOG = """\
conditions (all must hold; repeat each flag as needed):
  --min COLUMN=V             keep rows with COLUMN >= V
  --max COLUMN=V             keep rows with COLUMN <= V
  --keep-fraction COLUMN=F   keep the best fraction F (0.3 or 30%) of the eligible rows:
                             the HIGHEST values (clip_score, *_loglik, *_pvalue: higher = more
                             likely/aligned), except *_sqnorm columns, where LOWER is more likely
                             and the lowest are kept. Force a direction with COLUMN:highest=F or
                             COLUMN:lowest=F (e.g. image_loglik:lowest=0.01 for the outliers).
  --dedup DIR (a `wclip dedup` folder of these scores) makes the duplicates it removed ineligible, so
  fractions are of the deduplicated rows. --balance COLUMN (e.g. image_cluster) splits each fraction's
  k = ceil(F * n) kept rows between the groups of COLUMN in proportion to size ** --balance-alpha
  (default 0.5; no group above its size), each group keeping its best rows.
  Each fraction is resolved on its own over all eligible rows with a value (as in DataComp's
  baselines), exactly: the threshold is the k-th best value, k = ceil(F * n). Rows tied with the
  threshold are all kept, so a fraction keeps at least k rows. Only rows with status "ok" are
  eligible unless --include-failed; a missing value fails a condition.
  Scores of stats fitted with --clusters K also have the local likelihood's columns, used the same
  way: *_local_loglik (under the mixture of per-cluster Gaussians) and *_local_pvalue (against the
  held-out reference rows of the sample's own cluster), higher = more likely; and image_cluster /
  text_cluster, the cluster number (keep one cluster with --min image_cluster=J --max
  image_cluster=J). Asked of scores without them, they are refused before any work.

outputs in OUTPUT/: kept/*.parquet (kept rows, one file per score file), uids.npy (sorted DataComp
uids, dtype u8,u8; needs a uid per row, which img2dataset records only with
--save_additional_columns '["uid"]'), filter.json (conditions, thresholds, counts), and with
--input shards/ in img2dataset's layout (from tars, or with --input-format files|parquet from img2dataset's
other two layouts): NNNNN.tar (exact member bytes, --samples-per-shard kept
rows per tar), NNNNN.parquet (a row per kept sample: url, caption, uid, key, status, error_message,
..., the scores, and the local likelihood's columns when the scores have them) and NNNNN_stats.json
(count, successes, failed_to_download, ...; written last). Rerun the same command to resume. A kept
sample that cannot be read (truncated or changed input shard) is not copied; its row says why
(status failed_to_download) and filter.json lists it. When a key occurs twice in an input shard,
the copy at the scored position (the scores' `index`) is the one copied. The scores must come from
one fit and model (checked).

example:
  wclip filter --scores scores/ --output keep30/ --keep-fraction clip_score=0.3 \\
      --min image_loglik=-420 --input 'data/{00000..00127}.tar'
"""


def add_arguments(p):
    from pipeline.commands import DescribedHelpFormatter

    p.formatter_class = DescribedHelpFormatter
    p.epilog = EPILOG
    p.add_argument("--scores", required=True,
                   help="folder of score files from `wclip score` (local or fsspec URL: s3://, gs://, ...)")
    p.add_argument("--output", required=True, help="output folder (local or fsspec URL)")
    g = p.add_argument_group("conditions")
    g.add_argument("--min", action="append", default=[], metavar="COLUMN=V", help="keep COLUMN >= V")
    g.add_argument("--max", action="append", default=[], metavar="COLUMN=V", help="keep COLUMN <= V")
    g.add_argument("--keep-fraction", action="append", default=[], metavar="COLUMN[:DIR]=F",
                   help="keep the best fraction F by COLUMN (see below)")
    g.add_argument("--include-failed", action="store_true",
                   help="rows whose status is not 'ok' are eligible too")
    g.add_argument("--dedup", metavar="DIR",
                   help="a `wclip dedup` folder of these scores: the duplicates it removed are not eligible")
    g.add_argument("--balance", metavar="COLUMN",
                   help="split each --keep-fraction into per-group quotas of COLUMN (image_cluster, text_cluster)")
    g.add_argument("--balance-alpha", type=float, default=0.5, metavar="A",
                   help="--balance quotas proportional to group size ** A (1: the same fraction of every group; "
                        "0: the same number)")
    o = p.add_argument_group("outputs")
    o.add_argument("--input", nargs="+", metavar="SHARDS",
                   help="the scored shards (URLs, brace patterns, folders): also write new shards")
    o.add_argument("--input-format", default="webdataset", choices=INPUT_FORMATS,
                   help="the layout of --input, as scored: webdataset (tars), files (img2dataset's folders of "
                        "{key}.jpg/.txt/.json, each numbered subfolder a shard) or parquet (image bytes in a "
                        "column, each file a shard); the new shards are tars in any case, their members the "
                        "input's bytes (a files folder's files; a Parquet row's image and caption, its other "
                        "columns as the .json)"),
    o.add_argument("--samples-per-shard", type=int, default=10_000, help="samples per output shard")
    o.add_argument("--samples-per-task", type=int,
                   help="kept samples copied per Ray task (default: 4 output shards' worth)")
    o.add_argument("--no-uids", action="store_true", help="do not write uids.npy")
    o.add_argument("--dry-run", action="store_true",
                   help="check the flags and the scores, print what would be read and written; write nothing, "
                        "start no Ray")
    add_task_arguments(p, "copy task")


def run(args):
    import json
    import sys

    from pipeline.config import FilterConfig, RayOptions
    from pipeline.curate.filter import Condition, dry_run, run_filter
    from pipeline.curate.report import format_plan, format_report
    from pipeline.errors import UserError
    from pipeline.executors import open_executor

    try:
        conditions = tuple(Condition.parse(kind, text)
                           for kind, texts in (("min", args.min), ("max", args.max),
                                               ("fraction", args.keep_fraction))
                           for text in texts)
        inputs = ()
        if args.input:
            from pipeline.flow.formats import expand_inputs

            inputs = tuple(expand_inputs(args.input, args.input_format))
        cfg = FilterConfig(
            scores=args.scores, output=args.output, conditions=conditions,
            include_failed=args.include_failed, inputs=inputs, input_format=args.input_format,
            samples_per_shard=args.samples_per_shard, samples_per_task=args.samples_per_task,
            uids=not args.no_uids, ray=RayOptions(address=args.address, num_cpus=args.num_cpus),
            max_in_flight=args.max_in_flight, retries=args.retries,
            progress=False if args.no_progress else None, executor=args.executor, dedup=args.dedup,
            balance=args.balance, balance_alpha=args.balance_alpha)
        if args.dry_run:
            plan = dry_run(cfg)
            print(format_plan(plan), file=sys.stderr)
            print(json.dumps(plan))
            return 0
        with open_executor(cfg) as executor:  # Ray, if at all, starts with the first copy task
            report = run_filter(cfg, mapper=executor.map)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from exc
    print(format_report(report), file=sys.stderr)
    print(json.dumps(report))
    shards = report.get("shards") or {}
    return 1 if shards.get("failed") else 0

