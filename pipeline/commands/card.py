"""`wclip card`: a dataset card (README.md with a YAML header, PNG plots, card.json) for scores."""

HELP = "write a dataset card (README.md, plots, card.json) for a scores folder"

EPILOG = """\
The card refuses score files that are not readable Parquet, files made by different fits or models, and
a --stats file that did not make the scores (files from an older wclip, which record no provenance, are
accepted with a note). README.md's YAML header carries --license and `configs`/`data_files`, so the
Hugging Face Hub's dataset viewer shows the scores. The card folder is the dataset repository as written:
scores inside it are named where they are; scores elsewhere have their score files (*.parquet, not the
bookkeeping in SCORES.wclip/) copied into OUTPUT/<scores folder name>/ (a rerun replaces its own copies and drops those
of score files that are gone; a file there the card did not copy is refused); --data-files GLOB copies
nothing and says how to upload the score files. README.md ends with the `hf upload` command. With
stats fitted with --clusters K, the card also covers the local likelihood's columns and has a section on
each tower's clusters: sizes in the reference and in the corpus, and the rows of lowest local
log-likelihood in each cluster.

example:
  wclip card --scores scores/ --stats stats.safetensors --output card/ --license cc-by-4.0
  # card/scores/*.parquet are copies of the score files, card/README.md points the viewer at them
  hf upload USER/NAME card/ . --repo-type dataset --exclude '*.wclip/*'
"""


def add_arguments(p):
    from pipeline.commands import DescribedHelpFormatter

    p.formatter_class = DescribedHelpFormatter
    p.epilog = EPILOG
    p.add_argument("--scores", required=True,
                   help="folder of score files from `wclip score` (or the kept/ folder of `wclip filter`); "
                        "local or fsspec URL (s3://, gs://, ...)")
    p.add_argument("--stats", required=True,
                   help="the stats file the scores were computed with (local or URL)")
    p.add_argument("--output", required=True, help="card folder (local or fsspec URL)")
    p.add_argument("--filter", dest="filter_dir", metavar="FILTER_OUTPUT",
                   help="output folder of `wclip filter` (local or URL): describe the filter it applied")
    p.add_argument("--input", nargs="+", metavar="SHARDS",
                   help="where to read thumbnails (matched by shard name), when the shard URLs "
                        "recorded in the scores are not reachable from here")
    p.add_argument("--extremes", type=int, default=8, help="images in each least / most likely strip")
    p.add_argument("--no-thumbnails", action="store_true", help="do not read images from the shards")
    p.add_argument("--quantile-error", type=float, default=0.001,
                   help="relative error of the streaming quantiles")
    h = p.add_argument_group("Hugging Face Hub")
    h.add_argument("--license", default="unknown", metavar="ID",
                   help="license id for the README's YAML header (apache-2.0, mit, cc-by-4.0, ...); 'unknown' "
                        "by default, since the images and captions are their authors' and wclip cannot know the terms")
    h.add_argument("--data-files", metavar="GLOB",
                   help="where the score files are, relative to the card's README in the dataset repository, for "
                        "the Hub's dataset viewer; the card then copies nothing (default: the scores folder's path "
                        "below --output when it lies inside it, else SCORES_FOLDER_NAME/*.parquet, where the card "
                        "copies the score files)")


def run(args):
    import sys

    from pipeline.card.build import build_card
    from pipeline.card.hub import HubOptions
    from pipeline.config import CardConfig
    from pipeline.errors import UserError
    from pipeline.storage import join

    try:
        inputs = ()
        if args.input:
            from pipeline.flow.read import expand_shards

            inputs = tuple(expand_shards(args.input))
        cfg = CardConfig(scores=args.scores, stats=args.stats, output=args.output,
                         filter_dir=args.filter_dir, inputs=inputs, extremes=args.extremes,
                         rel_err=args.quantile_error, thumbnails=not args.no_thumbnails)
        card = build_card(cfg, HubOptions(license=args.license, data_files=args.data_files))
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from exc
    print(f"card for {card['rows']} rows -> {join(args.output, 'README.md')} "
          f"({len(card['plots'])} plots)", file=sys.stderr)
    for note in card["notes"]:
        print(f"  note: {note}", file=sys.stderr)
    return 0
