"""The README's set-up commands are the ones CI and the Makefile run: `make demo` and `make test` come first,
`.ci/run` runs `make test`, and the Makefile's `test` target runs pytest on the suite."""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _commands(script):
    """Shell command lines of a script or code block, without comments and blank lines."""
    lines = (line.split("#", 1)[0].strip() for line in script.splitlines())
    return [line for line in lines if line]


def _code_blocks(markdown):
    """`(language, body)` of every fenced code block."""
    return re.findall(r"^```(\w*)[ \t]*\n(.*?)^```", markdown, flags=re.M | re.S)


def _dry_run(target):
    """`make -n TARGET`: the commands the target would run (nothing is executed)."""
    if shutil.which("make") is None:
        pytest.fail("`make` is not installed, but CI and the README run it")
    p = subprocess.run(["make", "-n", "-C", ROOT, target], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"make -n {target} failed:\n{p.stderr}"
    return p.stdout


def test_readme_opens_with_make_demo_then_make_test():
    blocks = _code_blocks(_read("README.md"))
    assert blocks, "README.md has no fenced code block"
    language, body = blocks[0]
    assert language == "bash", f"the README's first code block is ```{language}, expected ```bash"
    assert _commands(body)[:2] == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command():
    assert "make test" in _commands(_read(".ci/run"))


def test_makefile_test_target_runs_pytest_on_the_suite():
    runs = _commands(_dry_run("test"))
    assert any(re.search(r"-m pytest\b.*\btests\b", line) for line in runs), runs


def test_every_make_command_in_the_readme_is_a_makefile_target():
    targets = {m for lang, body in _code_blocks(_read("README.md")) if lang in ("bash", "sh", "shell")
               for line in _commands(body) for m in re.findall(r"^make\s+([\w.-]+)", line)}
    assert {"demo", "test"} <= targets
    for target in sorted(targets):
        assert _dry_run(target).strip(), f"make {target} runs nothing"
