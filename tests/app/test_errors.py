"""app/errors.py: one-line messages and warnings."""

from byol_pytorch.app.errors import PROG, UserError, one_line, warn


def test_one_line_joins_every_run_of_whitespace():
    assert one_line("bad input:\n  the folder\t'x'  is empty\n") == "bad input: the folder 'x' is empty"
    assert one_line(ValueError("a\r\nb")) == "a b"
    assert one_line("") == ""


def test_warn_prints_one_prefixed_line_on_stderr(capsys):
    warn("curves.png skipped:\nno matplotlib")
    out, err = capsys.readouterr()
    assert out == ""
    assert (
        err
        == f"{PROG}: warning: curves.png skipped: no matplotlib\n"
        == "byol-pytorch: warning: " + ("curves.png skipped: no matplotlib\n")
    )


def test_user_error_is_an_exception_carrying_its_message():
    error = UserError("--batch-size 1 is too small")
    assert isinstance(error, Exception) and str(error) == "--batch-size 1 is too small"
