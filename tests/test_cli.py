import subprocess
import sys

from pipeline.cli import COMMANDS, build_parser


def test_every_command_has_help():
    parser = build_parser()
    for name in COMMANDS:
        with __import__("pytest").raises(SystemExit) as exc:
            parser.parse_args([name, "--help"])
        assert exc.value.code == 0


def test_python_dash_m_matches_console_script():
    out = subprocess.run([sys.executable, "-m", "pipeline", "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.startswith("wclip 0.")


def _wclip(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=120)


def test_usage_mistakes_are_one_line_saying_what_to_do():
    cases = [
        (["score", "--input", "x.tar", "--output", "o"],
         "wclip score: error: --stats is required; see `wclip score --help`"),
        (["filter", "--output", "o"], "wclip filter: error: --scores is required; see `wclip filter --help`"),
        (["card", "--scores", "s"], "wclip card: error: --stats, --output are required; see `wclip card --help`"),
        (["score", "--stats", "s", "--output", "o", "--input-format", "tar"],
         "wclip score: error: argument --input-format: invalid choice: 'tar' (choose from 'webdataset', 'files', "
         "'parquet'); see `wclip score --help`"),
        ([], "wclip: error: COMMAND is required; see `wclip --help`"),
    ]
    for argv, line in cases:
        out = _wclip(*argv)
        assert out.returncode == 2, out.stderr
        assert out.stderr.splitlines() == [line] and out.stdout == ""


def test_unknown_models_get_suggestions_whatever_the_weight_flags(tmp_path):
    stats = tmp_path / "missing.safetensors"
    for model, suggestion in (("wclip-dem", "(did you mean wclip-demo"), ("ViT-B-33", "(did you mean ViT-B-32")):
        out = _wclip("fit", "--input", str(tmp_path / "x.tar"), "--output", str(stats), "--model", model)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"wclip fit: error: unknown model {model!r} {suggestion}"), \
            out.stderr
        assert "has no weights" not in lines[0]
