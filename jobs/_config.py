"""Job configs: a YAML mapping whose keys are the flags of one ``wclip`` command, turned into that
command's argument list and run with :func:`pipeline.cli.main`.

Translation of ``key: value`` (``max_in_flight`` and ``max-in-flight`` both name ``--max-in-flight``):

- ``true`` on an on/off flag -> ``--key``; ``false`` or ``null`` -> left out;
- a list -> ``--key a b c``, or ``--key a --key b`` for a repeatable flag (``min``, ``max``, ...);
- a mapping on a repeatable flag -> ``--key col=v`` per entry (``min: {image_loglik: -420}``);
- anything else -> ``--key value``.

Flags given after ``--config PATH`` on the command line replace the config's value for that flag.
A stats file named by an ``s3://`` (any fsspec) URL is staged through a local temporary file:
downloaded before the command runs (``score --stats``, ``card --stats``), or written locally and
uploaded when the command has written it (``fit --output``), because stats files are read and written
with local file APIs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
from typing import Optional, Sequence


class JobConfigError(ValueError):
    """A job config that cannot become a ``wclip`` command line."""


def is_url(value) -> bool:
    """True for an fsspec URL other than a local ``file://`` one."""
    return isinstance(value, str) and "://" in value and not value.startswith("file://")


def load_config(path: str) -> dict:
    """Read a YAML job config (a local path or any fsspec URL) into a mapping of flag -> value."""
    import fsspec
    import yaml

    try:
        with fsspec.open(path, "rt") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError as exc:
        raise JobConfigError(f"job config {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise JobConfigError(f"job config {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise JobConfigError(f"job config {path} must be a mapping of flag: value, got {type(data).__name__}")
    for key in data:
        if not isinstance(key, str) or not key.strip():
            raise JobConfigError(f"job config {path}: keys must be flag names, got {key!r}")
    return data


def _flag(key: str) -> str:
    return "--" + key.strip().lstrip("-").replace("_", "-")


def _options(command: str) -> tuple[dict, dict]:
    """(option string -> argparse action) for ``wclip <command>`` and for the top-level ``wclip``."""
    from pipeline.cli import COMMANDS, build_parser

    if command not in COMMANDS:
        raise JobConfigError(f"unknown wclip command {command!r}; one of {', '.join(COMMANDS)}")
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    own = {o: a for a in sub.choices[command]._actions for o in a.option_strings}
    top = {o: a for a in parser._actions for o in a.option_strings if o not in ("-h", "--help", "--version")}
    return own, top


def _scalar(flag: str, value) -> str:
    if isinstance(value, (dict, list, tuple)):
        raise JobConfigError(f"{flag}: expected a single value, got {value!r}")
    return str(value)


def _values(flag: str, action, value) -> list:
    """The argument tokens for one config entry."""
    if value is None or value is False:
        return []
    if action.nargs == 0:
        if value is not True:
            raise JobConfigError(f"{flag} is an on/off flag: use true or false, got {value!r}")
        return [flag]
    if isinstance(action, argparse._AppendAction):
        if isinstance(value, dict):
            return [t for k, v in value.items() for t in (flag, f"{k}={_scalar(flag, v)}")]
        items = value if isinstance(value, (list, tuple)) else [value]
        return [t for v in items for t in (flag, _scalar(flag, v))]
    if isinstance(value, (list, tuple)):
        if action.nargs not in ("+", "*") and not isinstance(action.nargs, int):
            raise JobConfigError(f"{flag} takes one value, got the list {list(value)!r}")
        return [flag, *(_scalar(flag, v) for v in value)] if value else []
    if value is True:
        raise JobConfigError(f"{flag} takes a value, got true")
    return [flag, _scalar(flag, value)]


def config_argv(command: str, config: dict, skip: Sequence[str] = ()) -> list:
    """``wclip`` arguments (global flags, the command, its flags) for a config; ``skip``: flags to leave out."""
    own, top = _options(command)
    skip = {_flag(s) for s in skip}
    before, after = [], []
    for key, value in config.items():
        flag = _flag(key)
        if flag in skip:
            continue
        if flag in own:
            after += _values(flag, own[flag], value)
        elif flag in top:
            before += _values(flag, top[flag], value)
        else:
            known = sorted(o[2:].replace("-", "_") for o in own if o.startswith("--") and o != "--help")
            raise JobConfigError(f"config key {key!r} is not a flag of `wclip {command}`; "
                                 f"known keys: {', '.join(known)}")
    return [*before, command, *after]


def flags_in(tokens: Sequence[str]) -> list:
    """The long flags named in a list of command-line tokens (``--max-in-flight=4`` -> ``--max-in-flight``)."""
    return [t.split("=", 1)[0] for t in tokens if t.startswith("--") and len(t) > 2]


def build_argv(command: str, config: dict, overrides: Sequence[str] = ()) -> list:
    """The full ``wclip`` argument list: the config's flags, with ``overrides`` replacing the flags they name."""
    return [*config_argv(command, config, skip=flags_in(overrides)), *overrides]


def _parse(argv: list):
    """Parse with the real ``wclip`` parser (exits with its usage message on a bad flag)."""
    from pipeline.cli import build_parser

    return build_parser().parse_args(argv)


def _local_name(url: str, folder: str) -> str:
    return os.path.join(folder, os.path.basename(url.rstrip("/")) or "stats.safetensors")


def _download(url: str, local: str) -> None:
    import fsspec

    try:
        with fsspec.open(url, "rb") as src, open(local, "wb") as dst:
            dst.write(src.read())
    except (FileNotFoundError, OSError, ImportError, ValueError) as exc:
        raise JobConfigError(f"cannot read the stats file {url}: {type(exc).__name__}: {exc}") from exc


def _upload(local: str, url: str) -> None:
    from pipeline.storage import write_atomic

    with open(local, "rb") as fh:
        write_atomic(url, fh.read())


def _check_writable(url: str) -> None:
    """Fail before any work when the URL's filesystem cannot even be set up (missing s3fs, bad scheme)."""
    from pipeline.storage import filesystem

    try:
        filesystem(url)
    except (ImportError, ValueError) as exc:
        raise JobConfigError(f"cannot write to {url}: {type(exc).__name__}: {exc}") from exc


def run_job(command: str, argv: Optional[Sequence[str]] = None, download: Sequence[str] = (),
            upload: Sequence[str] = ()) -> int:
    """Entry point of ``python -m jobs.<command> --config PATH [--dry-run] [wclip flags...]``.

    ``download`` / ``upload`` name the flags whose file is staged through a local temporary copy when
    they hold a URL (see the module docstring). Returns the command's exit code.
    """
    from pipeline.cli import main

    p = argparse.ArgumentParser(prog=f"python -m jobs.{command}", allow_abbrev=False,
                                description=f"Run `wclip {command}` from a YAML config whose keys are its "
                                            f"flags; flags after the config replace the config's values.",
                                epilog=f"flags: see `wclip {command} --help`")
    p.add_argument("--config", help="YAML job config (local path or fsspec URL)")
    p.add_argument("--dry-run", action="store_true", help="print the wclip command line and exit")
    ours, overrides = p.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        config = load_config(ours.config) if ours.config else {}
        wclip_argv = build_argv(command, config, overrides)
    except JobConfigError as exc:
        print(f"jobs.{command}: error: {exc}", file=sys.stderr)
        return 2
    args = _parse(wclip_argv)
    staging = tempfile.mkdtemp(prefix=f"wclip-{command}-")
    staged_uploads = []
    try:  # stage remote stats files; a wrong URL fails here, before any work
        for name in download:
            url = getattr(args, name, None)
            if is_url(url):
                local = _local_name(url, staging)
                if not ours.dry_run:
                    _download(url, local)
                print(f"jobs.{command}: {_flag(name)} {url} -> local copy {local}", file=sys.stderr)
                wclip_argv += [_flag(name), local]
        for name in upload:
            url = getattr(args, name, None)
            if is_url(url):
                _check_writable(url)
                local = _local_name(url, staging)
                staged_uploads.append((local, url))
                wclip_argv += [_flag(name), local]
    except JobConfigError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        print(f"jobs.{command}: error: {exc}", file=sys.stderr)
        return 2
    print(f"jobs.{command}: wclip {shlex.join(wclip_argv)}", file=sys.stderr)
    if ours.dry_run:
        shutil.rmtree(staging, ignore_errors=True)
        return 0
    keep = False
    try:
        code = main(wclip_argv)
        for local, url in staged_uploads:
            if not os.path.isfile(local):
                continue  # the command failed before writing it; its own message says why
            try:
                _upload(local, url)
            except Exception as exc:  # the result is kept locally so a finished fit is not lost
                keep = True
                print(f"jobs.{command}: error: could not upload {local} to {url}: {type(exc).__name__}: "
                      f"{exc}; the file is kept at {local}", file=sys.stderr)
                return code or 1
            print(f"jobs.{command}: uploaded {url}", file=sys.stderr)
        return code
    finally:
        if not keep:
            shutil.rmtree(staging, ignore_errors=True)
