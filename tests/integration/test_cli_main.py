"""The console entry point: every usage error is one line on stderr and exit code 2."""

import pytest

from difforge.cli import main


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["sample", "--steps", "abc"], "--steps"),
        (["no-such-command"], "No such command"),
        (["sample", "--model", "/nonexistent/model", "--out", "/tmp/x.png"], "model not found"),
    ],
)
def test_usage_and_library_errors_are_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err
    assert "Traceback" not in err


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "train" in capsys.readouterr().out
