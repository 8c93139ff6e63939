"""The top-level command line: --help and --version stay light (no torch, no transformers), every flag has help."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safeshape import cli

PYTHON_DIR = str(Path(cli.__file__).resolve().parents[1])

# runs `safeshape ARGS`, then reports which heavy modules the run imported
_PROBE = """
import json, sys
from safeshape.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = ("torch", "transformers", "peft", "numpy", "safetensors", "safeshape._C")
print(json.dumps(sorted(m for m in heavy if m in sys.modules)), file=sys.stderr)
"""


def _probe(*args: str) -> tuple[str, list[str]]:
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env, timeout=120)
    return run.stdout, json.loads(run.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [("--help",), ("--version",)] + [(name, "--help") for name, _, _ in cli.SUBCOMMANDS])
def test_help_imports_no_heavy_module(args):
    out, heavy = _probe(*args)
    assert out.strip(), f"safeshape {' '.join(args)} printed nothing"
    assert heavy == [], f"safeshape {' '.join(args)} imported {heavy}"


def test_version_names_package_and_torch_build(capsys):
    from safeshape import __version__, _build_config

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"safeshape {__version__} ") and _build_config.TORCH_VERSION in out


def test_only_the_chosen_subcommand_is_built():
    parser = cli.build_parser("project")
    sub = next(a for a in parser._actions if a.dest == "command").choices
    assert any(a.dest == "adapter" for a in sub["project"]._actions)
    assert all(len(sub[name]._actions) == 1 for name in sub if name != "project")  # only -h


@pytest.mark.parametrize("name", [name for name, _, _ in cli.SUBCOMMANDS])
def test_every_flag_has_help(name):
    parser = cli.build_parser(name)
    sub = next(a for a in parser._actions if a.dest == "command").choices[name]
    # a help that is only the appended "(default X)" says nothing
    missing = [a.option_strings[0] for a in sub._actions
               if a.option_strings and not (a.help or "").replace("(default %(default)s)", "").strip()]
    assert not missing, f"safeshape {name}: flags without help: {missing}"


def test_unknown_subcommand_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["nonsense"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def _options(name):
    parser = cli.build_parser(name)
    sub = next(a for a in parser._actions if a.dest == "command").choices[name]
    return {o: a for a in sub._actions for o in a.option_strings}


@pytest.mark.parametrize("name", [name for name, _, _ in cli.SUBCOMMANDS])
def test_one_style_for_progress_and_json(name):
    """--no-progress hides progress bars everywhere; --json prints the result as JSON on stdout."""
    options = _options(name)
    assert "--no-progress" in options
    assert options["--json"].nargs == 0


@pytest.mark.parametrize("name", [name for name, _, _ in cli.SUBCOMMANDS])
def test_every_flag_is_documented(name):
    """Every flag appears in the README or a docs/ page (the repository's, not the package's)."""
    import re

    root = Path(__file__).resolve().parents[1]  # the repository's README and docs/, not the package's
    readme = "\n".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").rglob("*.md"))])
    parser = cli.build_parser(name)
    sub = next(a for a in parser._actions if a.dest == "command").choices[name]
    missing = [a.option_strings[-1] for a in sub._actions if a.option_strings and a.dest != "help"
               and not any(re.search(re.escape(o) + r"(?![\w-])", readme) for o in a.option_strings)]
    assert not missing, f"safeshape {name}: flags the README and docs/ never show: {missing}"


def test_defaults_and_texts_agree_across_commands():
    """--device is auto everywhere; the guard is a folder or a hub id; train's description names every loss; the
    command line offers only presets that can score (Granite Guardian 3.3 is refused by design)."""
    from safeshape.trainer.config import TrainConfig

    assert TrainConfig.__dataclass_fields__["device"].default == "auto"  # train's flags default to its config's
    for name in ("star", "eval", "project"):
        assert _options(name)["--device"].default == "auto", name
    for name in ("star", "eval"):
        guard = _options(name)["--guard"]
        assert "hub id" in guard.help and "local guard" not in guard.help
        assert "granite-guardian-3.3" not in _options(name)["--preset"].choices
        assert "granite-guardian-3" in _options(name)["--preset"].choices
    train_help = next(h for n, _, h in cli.SUBCOMMANDS if n == "train")
    assert all(loss in train_help for loss in ("SFT", "RS", "DSS", "Deep Token"))
    star_help = next(h for n, _, h in cli.SUBCOMMANDS if n == "star")
    assert "local" not in star_help


def test_known_third_party_warnings_are_quiet_on_the_command_line(monkeypatch):
    """The FutureWarning PEFT triggers on every model it wraps is not printed by a command; outside a command it is
    the caller's to filter."""
    import warnings

    import safeshape.safelora.cli as project_cli

    def noisy(args):
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something else", FutureWarning)
        return 0

    monkeypatch.setattr(project_cli, "main", noisy)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert cli.main(["project", "--base", "b", "--aligned", "a", "--adapter", "x", "--out", "o"]) == 0
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
    assert [str(w.message) for w in seen] == ["something else",
                                             "`is_gradient_checkpointing` is deprecated and will be removed in v6."]


def test_json_stdout_carries_the_report_alone(capsys):
    """--json: whatever a library prints to stdout while the command runs (deepspeed's logger, whose handler holds
    stdout from its import, prints its accelerator warning when transformers imports it) goes to stderr."""
    import argparse
    import logging

    from safeshape.io import json_main, print_json

    chatty = logging.getLogger("safeshape-test-chatty")
    chatty.propagate = False
    chatty.addHandler(logging.StreamHandler(stream=sys.stdout))  # made before the command, as an import makes it

    @json_main
    def main(args):
        print("a library's print")
        chatty.warning("a library's log line")
        print_json({"ok": True})
        return 0

    assert main(argparse.Namespace(json=True)) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ['{"ok": true}'] and "a library's print" in err and "a library's log line" in err
    assert main(argparse.Namespace(json=False)) == 0  # without --json nothing moves
    out, _ = capsys.readouterr()
    assert "a library's print" in out and "a library's log line" in out
    assert chatty.handlers[0].stream is sys.stdout  # put back
