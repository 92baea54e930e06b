import pytest

from egrpo_ray.cli import build_parser, main

COMMANDS = ["plan", "config", "reference", "train", "serve-rewards", "eval", "pretrain-tiny"]


def test_every_command_is_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(COMMANDS) <= set(sub.choices)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_on_each_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: egrpo-ray " + command in capsys.readouterr().out


def test_unknown_command_and_bad_flag_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fly"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    with pytest.raises(SystemExit) as e:
        main(["plan", "--steps", "many"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_train_rejects_bad_config_before_starting_anything(capsys, tmp_path):
    assert main(["train", "--set", "learner.workers=0", "--output-dir", str(tmp_path)]) == 2
    assert "learner.workers" in capsys.readouterr().err
    assert main(["train", "--resume", "--output-dir", str(tmp_path / "empty")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
