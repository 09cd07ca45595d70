"""The icm command line: one name per stage, old names as deprecated aliases, user errors as
one line (no Ray, no model: only the parser and the renaming)."""

from __future__ import annotations

import pytest

from jobs.cli import DEPRECATED_COMMANDS, JOB_COMMANDS, _renamed, build_parser, main
from icm.config import PipelineConfig


def test_each_stage_has_one_name_for_command_config_and_module():
    import importlib.util

    stages = set(PipelineConfig.model_fields["stages"].default) | {"tune", "oracles"}
    for command in JOB_COMMANDS:
        name = command.replace("-", "_")
        assert name in stages or name in PipelineConfig.model_fields, command  # a config section
        assert importlib.util.find_spec(f"jobs.{name}") is not None, command


def test_old_names_still_run_with_a_deprecation_line(capsys):
    for old, new in DEPRECATED_COMMANDS.items():
        assert _renamed([old, "--config", "smoke"]) == [new, "--config", "smoke"]
        assert f"use 'icm {new}'" in capsys.readouterr().err
    assert _renamed(["evaluate", "--adapter", "a", "--task", "t"])[0] == "score"
    assert _renamed(["evaluate", "--config", "study"]) == ["evaluate", "--config", "study"]


def test_score_takes_its_defaults_from_a_preset():
    args = build_parser().parse_args(["score", "--base-only", "--task", "t", "--config", "study"])
    assert args.max_length is None and args.config == "study"  # filled from evaluate.* when run


def test_a_user_error_is_one_line_and_exit_code_2(capsys, tmp_path):
    assert main(["score", "--base-only", "--task", str(tmp_path / "nope"), "--config", "smoke"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("icm: error:") and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["train-loras", "--no-such-flag"])


def test_serve_flags_are_parsed_by_the_one_front_end_without_importing_ray():
    import subprocess
    import sys

    code = ("import sys; from jobs.cli import build_parser; "
            "a = build_parser().parse_args(['serve', '--generator', 'g', '--port', '8123', "
            "'--engine', 'hf']); "
            "assert (a.generator, a.port, a.adapters, a.engine) == ('g', 8123, None, 'hf'), a; "
            "assert a.config is None; "  # each engine's own config file (serve_apps.serve_env)
            "assert 'ray' not in sys.modules, 'icm serve --help would wait for Ray'")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(SystemExit):  # --generator is required, by the same parser
        build_parser().parse_args(["serve"])
