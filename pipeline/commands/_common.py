"""Flags shared by the streaming commands (fit, score) and their translation into configs."""

from __future__ import annotations

import json
import os
import sys

from pipeline.config import DECODE_PLACES, PRECISIONS, EncodeConfig, InputConfig, RunConfig
from pipeline.errors import UserError


def add_input_arguments(p) -> None:
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True, metavar="SHARDS",
                   help="shard URLs or brace patterns (data/{00000..00099}.tar), local folders, "
                        "s3:// gs:// http(s):// URLs, or pipe:COMMAND")
    g.add_argument("--image-ext", default=",".join(InputConfig.image_exts),
                   help="image member extensions, first present wins")
    g.add_argument("--caption-ext", default=",".join(InputConfig.caption_exts),
                   help="caption member extensions, first present wins")
    g.add_argument("--max-image-pixels", type=int, default=InputConfig.max_image_pixels,
                   help="refuse images with more pixels (decompression bombs)")
    g.add_argument("--decode", default=InputConfig.decode, choices=DECODE_PLACES,
                   help="where JPEGs are decoded: cpu (reader tasks, PIL; the default) or gpu (the encoder "
                        "actor, torchvision.io.decode_jpeg on its --device: nvJPEG on CUDA); other formats "
                        "are always decoded on the CPU")


def add_model_arguments(p, required: bool) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, default=None,
                   help="open_clip architecture (ViT-B-32, ViT-L-14, ...) or the built-in 'wclip-demo'"
                        + ("" if required else "; default: the model the stats were fitted with"))
    src = g.add_mutually_exclusive_group()
    src.add_argument("--pretrained", help="open_clip pretrained tag (downloaded by open_clip)")
    src.add_argument("--checkpoint", help="local weights file (.safetensors, or a .pt state dict)")
    src.add_argument("--random-init", action="store_true",
                     help="random weights: for tests and throughput benchmarks only (scores mean nothing)")
    g.add_argument("--model-seed", type=int, default=0, help="seed of --random-init weights")


def add_run_arguments(p) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    g.add_argument("--num-cpus", type=int, help="local Ray: CPUs to use")
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


def _exts(value: str) -> tuple:
    return tuple(e.strip().lstrip(".").lower() for e in value.split(",") if e.strip())


def model_spec(args, default=None):
    from pipeline.models import ModelSpec

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
        return ModelSpec(name=name, pretrained=pretrained, checkpoint=checkpoint, random_init=random_init, seed=seed)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def run_config(args, spec, normalize: bool):
    from pipeline.config import RayOptions
    from pipeline.flow.read import expand_shards

    try:
        shards = tuple(expand_shards(args.input))
    except ValueError as exc:
        raise UserError(str(exc)) from exc
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
                               max_image_pixels=args.max_image_pixels, decode=args.decode),
            ray=RayOptions(address=args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus),
            chunk_size=args.chunk_size, max_in_flight=args.max_in_flight, encoders=args.encoders,
            retries=args.retries, progress=False if args.no_progress else None)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def print_summary(title: str, summary: dict) -> int:
    """Human summary on stderr, JSON on stdout; exit code 1 when shards failed."""
    print(f"\n{title}: {summary.get('rows', 0)} rows from {summary.get('shards_done', 0)} shards "
          f"({summary.get('shards_skipped', 0)} already done) in {summary.get('elapsed_s', 0)} s"
          f" — {summary.get('samples_per_s')} samples/s", file=sys.stderr)
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
