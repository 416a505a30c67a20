"""Flags shared by the streaming commands (fit, score) and their translation into configs."""

from __future__ import annotations

import json
import os
import sys

from pipeline.config import DECODE_PLACES, EXECUTORS, INPUT_FORMATS, PRECISIONS, EncodeConfig, InputConfig, RunConfig
from pipeline.errors import UserError
from pipeline.models import builtin_models


def add_input_arguments(p) -> None:
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", metavar="SHARDS",
                   help="shard URLs or brace patterns (data/{00000..00099}.tar), local folders, "
                        "s3:// gs:// http(s):// URLs, or pipe:COMMAND")
    g.add_argument("--input-format", default=InputConfig.input_format, choices=INPUT_FORMATS,
                   help="webdataset: tar shards; files: img2dataset's folders of {key}.jpg/.txt/.json (each "
                        "numbered subfolder a shard); parquet: image bytes in a column (img2dataset's parquet "
                        "output, Hugging Face image datasets), each file a shard")
    g.add_argument("--image-ext", default=",".join(InputConfig.image_exts),
                   help="image member extensions, first present wins")
    g.add_argument("--caption-ext", default=",".join(InputConfig.caption_exts),
                   help="caption member extensions, first present wins")
    g.add_argument("--max-image-pixels", type=int, default=InputConfig.max_image_pixels,
                   help="refuse images with more pixels (decompression bombs)")
    g.add_argument("--max-member-bytes", type=int, default=InputConfig.max_member_bytes,
                   help="tar members larger than this are not read; their sample gets status 'read'")
    g.add_argument("--max-aspect-ratio", type=float, default=InputConfig.max_aspect_ratio,
                   help="refuse images longer than this times their width (or the reverse): CLIP's resize "
                        "would blow them up")
    g.add_argument("--stall-timeout", type=float, default=InputConfig.stall_timeout,
                   help="seconds without a byte from a remote or pipe: shard before its read counts as failed "
                        "(retried, then recorded)")
    g.add_argument("--no-jpeg-draft", dest="jpeg_draft", action="store_false",
                   help="decode JPEGs at full size before CLIP's resize (the default decodes at the smallest "
                        "1/2, 1/4 or 1/8 scale that still covers the model's input size: several times faster "
                        "on photos, pixels within a few levels)")
    g.add_argument("--decode", default=InputConfig.decode, choices=DECODE_PLACES,
                   help="where JPEGs are decoded: cpu (reader tasks, PIL; the default) or gpu (the encoder "
                        "actor, torchvision.io.decode_jpeg on its --device: nvJPEG on CUDA); other formats "
                        "are always decoded on the CPU")


def add_model_arguments(p, required: bool) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, default=None,
                   help="open_clip architecture (ViT-B-32, ViT-L-14, ...) with --pretrained/--checkpoint, a Hub "
                        "model hf-hub:org/name (DataComp's and LAION's), or a built-in model ("
                        + ", ".join(builtin_models()) + ")"
                        + ("" if required else "; default: the model the stats were fitted with"))
    src = g.add_mutually_exclusive_group()
    src.add_argument("--pretrained", help="open_clip pretrained tag, e.g. laion2b_s34b_b79k (downloaded once, "
                                          "then read from the cache)")
    src.add_argument("--checkpoint", help="local weights file (.safetensors, or a .pt state dict)")
    src.add_argument("--random-init", action="store_true",
                     help="random weights: for tests and throughput benchmarks only (scores mean nothing)")
    g.add_argument("--model-seed", type=int, default=0, help="seed of --random-init weights")
    g.add_argument("--cache-dir", help="where downloaded weights are cached and looked for offline "
                                       "(default: open_clip's ~/.cache/clip and the Hugging Face cache, HF_HOME)")


def add_run_arguments(p) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--executor", choices=EXECUTORS, default="auto",
                   help="where the work runs: local (this machine, no Ray: worker processes for shards, threads "
                        "for embedding files) or ray (a Ray cluster, or a private local Ray); auto: Ray for a "
                        "cluster (--address / RAY_ADDRESS), GPUs or --encoders, else local")
    g.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    g.add_argument("--num-cpus", type=int, help="CPUs to use on this machine (local executor or local Ray)")
    g.add_argument("--num-gpus", type=int, help="local Ray: GPUs to use")
    g.add_argument("--device", default=EncodeConfig.device, help="encoder device: auto, cpu, cuda")
    g.add_argument("--precision", default=EncodeConfig.precision, choices=PRECISIONS,
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--batch-size", type=int, default=EncodeConfig.batch_size, help="samples per forward pass")
    g.add_argument("--chunk-size", type=int, default=RunConfig.chunk_size,
                   help="samples per message from readers to encoders")
    g.add_argument("--max-in-flight", type=int, help="shards read at once (default: CPUs)")
    g.add_argument("--encoders", type=int, help="encoder actors (default: one per GPU, else one)")
    g.add_argument("--retries", type=int, default=RunConfig.retries, help="extra attempts for a failed shard")
    g.add_argument("--compile", action="store_true", help="torch.compile the encoders")
    g.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")


def add_task_arguments(p, task: str) -> None:
    """The execution flags of a command whose work is file-sized tasks (``task``: what one is called, e.g. the
    filter's "copy task"): threads of the command, or Ray tasks."""
    tasks = task + "s"
    r = p.add_argument_group("execution")
    r.add_argument("--executor", choices=EXECUTORS, default="auto",
                   help=f"where the {tasks} run: local (threads of this command, no Ray) or ray; auto: Ray for a "
                        f"cluster (--address / RAY_ADDRESS), else local")
    r.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    r.add_argument("--num-cpus", type=int, help="CPUs to use on this machine")
    r.add_argument("--max-in-flight", type=int, help=f"{tasks} at once (default: CPUs)")
    r.add_argument("--retries", type=int, default=2, help=f"extra attempts for a failed {task}")
    r.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")


def _exts(value: str) -> tuple:
    return tuple(e.strip().lstrip(".").lower() for e in value.split(",") if e.strip())


def model_spec(args, default=None):
    from pipeline.models import ModelSpec, preflight

    default = default or {}
    name = args.model or default.get("model") or (default.get("model_identity") or {}).get("model")
    if name is None:
        raise UserError("--model is required")
    pretrained, checkpoint, random_init = args.pretrained, args.checkpoint, args.random_init
    seed = args.model_seed
    if args.model is None and default and not (pretrained or checkpoint or random_init):
        pretrained, random_init = default.get("pretrained"), default.get("random_init_seed") is not None
        seed = default.get("random_init_seed") or 0
        checkpoint = None
        if default.get("checkpoint_sha256"):
            raise UserError("the stats were fitted with a local checkpoint: pass the same --model and --checkpoint")
    try:
        spec = ModelSpec(name=name, pretrained=pretrained, checkpoint=checkpoint, random_init=random_init, seed=seed,
                         cache_dir=args.cache_dir)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    preflight(spec)  # an unknown or unavailable model is one line, before Ray starts
    return spec


def run_config(args, spec, normalize: bool):
    from pipeline.config import RayOptions
    from pipeline.flow.formats import expand_inputs

    try:
        shards = tuple(absolute(u) for u in expand_inputs(args.input, args.input_format))
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    _check_device(args)
    missing = [u for u in shards if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise UserError(f"{len(missing)} of {len(shards)} input shards do not exist: {', '.join(missing[:3])}{more}")
    try:
        return RunConfig(
            shards=shards, model=spec,
            encode=EncodeConfig(device=args.device, precision=args.precision, batch_size=args.batch_size,
                                normalize=normalize, compile=args.compile),
            inputs=InputConfig(image_exts=_exts(args.image_ext), caption_exts=_exts(args.caption_ext),
                               max_image_pixels=args.max_image_pixels, decode=args.decode,
                               max_member_bytes=args.max_member_bytes, max_aspect_ratio=args.max_aspect_ratio,
                               stall_timeout=args.stall_timeout, input_format=args.input_format,
                               jpeg_draft=args.jpeg_draft),
            ray=RayOptions(address=args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus),
            chunk_size=args.chunk_size, max_in_flight=args.max_in_flight, encoders=args.encoders,
            retries=args.retries, progress=False if args.no_progress else None, executor=args.executor)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def absolute(url: str) -> str:
    """A local path made absolute (URLs and ``pipe:`` commands as they are): the scores record each sample's
    shard, and `wclip card` (thumbnails) or `wclip filter` run from another folder must find it."""
    return url if "://" in url or url.startswith("pipe:") else os.path.abspath(url)


def _check_device(args) -> None:
    """``--device cuda`` on a machine without CUDA, with no cluster to run on: say so now, not hang."""
    if not args.device.startswith("cuda") or args.address or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: this machine has no usable CUDA GPU; use --device cpu (or auto), "
                        f"or --address to run on a Ray cluster with GPU nodes")


def print_summary(title: str, summary: dict) -> int:
    """Human summary on stderr, JSON on stdout; exit code 1 when shards failed."""
    rate = summary.get("samples_per_s")
    print(f"\n{title}: {summary.get('rows', 0)} rows from {summary.get('shards_done', 0)} shards "
          f"({summary.get('shards_skipped', 0)} already done) in {summary.get('elapsed_s', 0)} s"
          + (f" — {rate} samples/s" if rate else ""), file=sys.stderr)
    for status, count in summary.get("status_counts", {}).items():
        print(f"  {status:>8}: {count}", file=sys.stderr)
    for shard, damage in summary.get("damaged", []):
        print(f"  damaged shard {shard}: {damage}", file=sys.stderr)
    if summary.get("failed"):
        print(f"  FAILED shards ({len(summary['failed'])}), rerun the same command to retry them:", file=sys.stderr)
        for f in summary["failed"]:
            print(f"    {f['shard']}: {f['error'].splitlines()[0]}", file=sys.stderr)
    print(json.dumps(summary, default=str))
    return 1 if summary.get("failed") else 0


# -- precomputed embeddings and --dry-run (fit, score) ------------------------------------------------------
def add_embedding_arguments(p) -> None:
    g = p.add_argument_group("precomputed embeddings (instead of --input; no model is loaded)")
    g.add_argument("--embeddings", nargs="+", metavar="PATHS",
                   help="clip-retrieval / LAION embedding folders (img_emb/, text_emb/, metadata/), or DataComp "
                        "shards: {shard}.npz beside {shard}.parquet (URLs, brace patterns, globs, or folders)")
    g.add_argument("--embedding-key", choices=("l14", "b32"),
                   help="DataComp: which arrays of the .npz ({key}_img, {key}_txt); score defaults to the fit's")
    g.add_argument("--embeddings-model", metavar="MODEL",
                   help="the model that made the embeddings, as ARCH/TAG (ViT-L-14/openai), hf-hub:org/name, "
                        "ARCH@CHECKPOINT (a local weights file), MODEL@WEIGHTS as a stats file records them, or a "
                        "built-in model (" + ", ".join(builtin_models()) + "); score: accept stats fitted on that "
                        "model's tar shards (same normalisation, same width), refuse any other model; fit: record it "
                        "as the stats' model. Recorded in the outputs")
    p.add_argument("--dry-run", action="store_true",
                   help="say what would be read, skipped and written, then exit (no Ray, no model)")


def not_required(p, *dests: str) -> None:
    """Make flags that ``--embeddings`` does not need optional after the fact; the command checks them."""
    for action in p._actions:
        if action.dest in dests:
            action.required = False


def uses_embeddings(args, needs: tuple = ()) -> bool:
    """True for ``--embeddings``, False for ``--input``; a UserError for neither or both, and for a missing
    flag of ``needs`` that --input requires."""
    if bool(args.input) == bool(args.embeddings):
        raise UserError("give the inputs as either --input SHARDS or --embeddings PATHS" +
                        (" (not both)" if args.input else ""))
    if args.input and args.embeddings_model:
        raise UserError("--embeddings-model names the model of --embeddings; with --input the model is --model")
    if args.input:
        for flag in needs:
            if getattr(args, flag.lstrip("-").replace("-", "_")) is None:
                raise UserError(f"{flag} is required with --input")
    return bool(args.embeddings)


def embedding_run_config(args):
    """An :class:`pipeline.config.EmbeddingRunConfig` from ``--embeddings`` and the execution flags."""
    from pipeline.config import EmbeddingRunConfig, RayOptions
    from pipeline.models import DeclaredModel

    device = "cpu" if args.device == "auto" else args.device  # NumPy on the CPU unless a device is named
    if device != "cpu":
        _check_device(args)
    try:
        declared = DeclaredModel.parse(args.embeddings_model, args.cache_dir) if args.embeddings_model else None
        return EmbeddingRunConfig(paths=tuple(args.embeddings), key=args.embedding_key,
                                  ray=RayOptions(address=args.address, num_cpus=args.num_cpus),
                                  max_in_flight=args.max_in_flight, retries=args.retries,
                                  progress=False if args.no_progress else None, executor=args.executor,
                                  model=declared, device=device, backend=getattr(args, "backend", "auto"))
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def print_plan(title: str, plan: dict) -> int:
    """``--dry-run``: what a run would read, skip and write; human lines on stderr, JSON on stdout; exit 0."""
    print(f"\n{title} (dry run, nothing written): {plan.get('inputs')} {plan.get('input_kind', 'inputs')}, "
          f"{plan.get('to_do')} to do, {plan.get('skipped', 0)} already done and skipped", file=sys.stderr)
    for key in ("skipped_names", "to_do_names", "writes"):
        if plan.get(key):
            print(f"  {key.replace('_', ' ')}: {', '.join(map(str, plan[key]))}", file=sys.stderr)
    print(json.dumps(plan, default=str))
    return 0
