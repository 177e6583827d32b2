"""The documentation: its examples run, its reference is complete, its build is strict.

* Every ```` ```python ```` block of README.md and docs/ that is preceded by
  ``<!-- run -->`` runs as a script (``python example.py``), and every one
  preceded by ``<!-- run: pytest -->`` as a test file under pytest with
  graphexec's plugin, each in a subprocess in a temporary directory, bounded
  in time. A complete example carries the marker; fragments do not.
* The reference page documents every name of ``graphexec.__all__``, and every
  public name has a docstring (``docs_hooks.py`` fails the site's build on one
  without; checking it here too tells the suite first).
* ``mkdocs build --strict`` passes, and fails on a broken link. These need
  the ``docs`` extra: without it they skip, unless ``GRAPHEXEC_REQUIRE_DOCS``
  is set, as ``.ci/run`` does once it has installed the extra.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

import graphexec as gx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # docs_hooks.py sits at the root, beside mkdocs.yml
import docs_hooks  # noqa: E402

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
EXAMPLE_TIMEOUT = 120  # seconds; the slowest starts a dask cluster
BUILD_TIMEOUT = 180  # seconds for one `mkdocs build`

MARKER = re.compile(r"^<!-- run(?:: (?P<how>pytest))? -->$")


@dataclass(frozen=True)
class Example:
    page: Path
    line: int  # of the marker, 1-based
    how: str  # "script" or "pytest"
    code: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def examples(page: Path) -> list[Example]:
    """The marked blocks of ``page``; a marker not followed by a python block fails."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found = []
    for i, line in enumerate(lines):
        match = MARKER.match(line.strip())
        if not match:
            continue
        where = f"{page.name}:{i + 1}"
        if i + 1 >= len(lines) or lines[i + 1].strip() != "```python":
            raise AssertionError(f"{where}: a run marker must be followed by a ```python block")
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise AssertionError(f"{where}: the ```python block is not closed")
        code = "\n".join(lines[i + 2 : end]) + "\n"
        found.append(Example(page, i + 1, match["how"] or "script", code))
    return found


EXAMPLES = [example for page in PAGES for example in examples(page)]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["CI"] = "1"  # no progress bar in the captured output
    return env


@pytest.mark.timeout(EXAMPLE_TIMEOUT + 30)
@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_example_runs(example: Example, tmp_path: Path) -> None:
    if example.how == "pytest":
        (tmp_path / "test_example.py").write_text(example.code)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "graphexec_pytest"]
        command += ["-p", "no:cacheprovider", "test_example.py"]
    else:
        (tmp_path / "example.py").write_text(example.code)
        command = [sys.executable, "example.py"]
    try:
        proc = subprocess.run(
            command,
            cwd=tmp_path,  # its cache directory and report land here
            env=_env(),
            capture_output=True,
            text=True,
            timeout=EXAMPLE_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{example.id} ran past {EXAMPLE_TIMEOUT} s:\n{exc.stdout!r}\n{exc.stderr!r}")
    assert proc.returncode == 0, (
        f"{example.id} exited with {proc.returncode}\n--- stdout\n{proc.stdout}"
        f"\n--- stderr\n{proc.stderr}"
    )


def test_the_complete_examples_are_marked() -> None:
    # Each page that teaches by example has at least one example that runs.
    marked = {e.page.relative_to(ROOT).as_posix() for e in EXAMPLES}
    assert {
        "README.md",
        "docs/index.md",
        "docs/tutorial.md",
        "docs/howto/from-dask.md",
        "docs/howto/from-concurrent-futures.md",
        "docs/howto/caching.md",
        "docs/howto/cluster.md",
        "docs/howto/debugging.md",
        "docs/howto/pytest.md",
    } <= marked
    assert len([e for e in EXAMPLES if e.how == "pytest"]) >= 2


def test_a_marker_without_a_python_block_is_an_error(tmp_path: Path) -> None:
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    page.write_text("<!-- run -->\n```bash\necho hi\n```\n")
    with pytest.raises(AssertionError, match=r"page\.md:1: a run marker must be followed by"):
        examples(page)


def test_the_reference_documents_every_public_name() -> None:
    reference = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    documented = re.findall(r"^::: graphexec\.(\w+)$", reference, re.MULTILINE)
    assert sorted(documented) == sorted(gx.__all__)


def test_every_public_name_has_a_docstring() -> None:
    assert docs_hooks.undocumented(gx) == []


def test_undocumented_finds_names_methods_and_properties() -> None:
    class Documented:
        """Has one."""

        def method(self) -> None:
            """Has one."""

        def bare(self) -> None:
            pass

        @property
        def prop(self) -> int:
            return 1

        def _private(self) -> None:
            pass

    class Bare:
        pass

    def function() -> None:
        pass

    module = types.ModuleType("fake")
    module.Documented, module.Bare, module.function = Documented, Bare, function  # type: ignore[attr-defined]
    module.__all__ = ["Documented", "Bare", "function"]  # type: ignore[attr-defined]
    assert docs_hooks.undocumented(module) == [
        "fake.Documented.bare",
        "fake.Documented.prop",
        "fake.Bare",
        "fake.function",
    ]


def test_readme_is_a_landing_page() -> None:
    assert (ROOT / "README.md").stat().st_size < 12 * 1024


# -- the site's build -----------------------------------------------------------------


def _mkdocs() -> str:
    found = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if found is None:
        if os.environ.get("GRAPHEXEC_REQUIRE_DOCS"):
            pytest.fail("GRAPHEXEC_REQUIRE_DOCS is set but mkdocs is not installed")
        pytest.skip("needs the docs extra: pip install -e '.[docs]' (CI installs it)")
    return found


def _site_copy(tmp_path: Path) -> Path:
    """The site's sources in ``tmp_path``, the package linked, so a page can be broken."""
    site = tmp_path / "site-src"
    site.mkdir()
    shutil.copytree(ROOT / "docs", site / "docs")
    for name in ("mkdocs.yml", "docs_hooks.py", "README.md"):
        shutil.copy(ROOT / name, site / name)
    (site / "graphexec").symlink_to(ROOT / "graphexec")
    return site


def _build(site: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_mkdocs(), "build", "--strict", "--site-dir", str(tmp_path / "out")],
        cwd=site,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )


@pytest.mark.timeout(2 * BUILD_TIMEOUT)
def test_the_strict_build_passes_and_fails_on_a_broken_link(tmp_path: Path) -> None:
    _mkdocs()
    site = _site_copy(tmp_path)
    ok = _build(site, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "reference" / "index.html").is_file()

    with open(site / "docs" / "tutorial.md", "a", encoding="utf-8") as f:
        f.write("\nSee [the missing page](howto/no-such-page.md).\n")
    broken = _build(site, tmp_path)
    assert broken.returncode != 0
    assert "no-such-page.md" in broken.stderr
