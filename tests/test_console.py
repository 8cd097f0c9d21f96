"""console.RichReporter: a progress bar on a terminal, plain unwrapped lines in a pipe or CI."""

import io

from rich.console import Console

from flexslim.system.console import RichReporter, in_ci

LONG = "epoch   1/4  loss 2.293  widths " + str({f"stage{i}": 8 * i for i in range(1, 12)})


def _epoch_loop(reporter, epochs=3, steps=5):
    for e in range(epochs):
        reporter.start(f"search {e + 1}/{epochs}", steps)
        for s in range(steps):
            reporter.advance(f"loss {s}")
        reporter.stop()
        reporter.log(f"{LONG} [epoch {e + 1}]")


def test_without_a_terminal_one_line_per_log_and_no_redraws():
    buf = io.StringIO()
    reporter = RichReporter(Console(file=buf, width=80))  # a pipe: not a terminal
    assert reporter.plain
    _epoch_loop(reporter)
    lines = buf.getvalue().splitlines()
    assert lines == [f"{LONG} [epoch {e}]" for e in (1, 2, 3)]  # not wrapped at 80 columns, markup left alone


def test_ci_forces_plain_lines_even_on_a_terminal(monkeypatch):
    monkeypatch.setenv("CI", "true")
    buf = io.StringIO()
    assert RichReporter(Console(file=buf, force_terminal=True)).plain


def test_a_terminal_keeps_the_progress_bar(monkeypatch):
    for key in ("CI", "GITHUB_ACTIONS", "GITLAB_CI", "BUILDKITE", "JENKINS_URL", "TF_BUILD"):
        monkeypatch.delenv(key, raising=False)
    buf = io.StringIO()
    reporter = RichReporter(Console(file=buf, force_terminal=True, width=120))
    assert not reporter.plain
    _epoch_loop(reporter, epochs=1)
    assert "search 1/1" in buf.getvalue() and "5/5" in buf.getvalue()


def test_in_ci():
    assert in_ci({"CI": "true"}) and in_ci({"GITHUB_ACTIONS": "1"})
    assert not in_ci({}) and not in_ci({"CI": "false"}) and not in_ci({"CI": "0"})
