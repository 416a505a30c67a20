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
