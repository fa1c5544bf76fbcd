"""The documentation's examples run as written, and its links resolve.

Every ```python block of every docs/*.md runs, the blocks of one file in order
in one namespace (a later block may use what an earlier one defined).
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
DOC_FILES = sorted(DOCS.glob("*.md"))
ALL_DOCS = [README, *DOC_FILES, ROOT / "experiments" / "README.md"]


def fenced_blocks(path: pathlib.Path) -> list[tuple[str, str]]:
  """(language, body) of every fenced block of `path`, in order."""
  return re.findall(r"^```(\w*)\n(.*?)^```$", path.read_text(), flags=re.S | re.M)


def python_blocks(path: pathlib.Path) -> list[str]:
  return [body for lang, body in fenced_blocks(path) if lang == "python"]


def run_python(blocks: list[str], name: str) -> dict:
  """Runs `blocks` in order in one namespace; returns it."""
  namespace = {"__name__": f"docs_{name}"}
  for i, block in enumerate(blocks):
    exec(compile(block, f"{name}:block{i}", "exec"), namespace)  # pylint: disable=exec-used
  return namespace


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_docs_python_examples_run(path):
  blocks = python_blocks(path)
  namespace = run_python(blocks, path.name)
  # Every block ran to its end: the names its last lines assign exist.
  for block in blocks:
    assigned = re.findall(r"^(\w+)\s*=", block, flags=re.M)
    assert all(name in namespace for name in assigned), path.name


def test_docs_hold_the_examples_the_readme_points_to():
  """The pages the README sends a reader to for examples have them."""
  for page in ("library.md", "routers.md"):
    assert python_blocks(DOCS / page), page


@pytest.mark.parametrize("path", ALL_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
  """Every relative link (file and, for .md targets, #anchor) exists."""
  text = path.read_text()
  links = re.findall(r"\]\(([^)\s]+)\)", text)
  assert links or path.name != "README.md"
  for link in links:
    if re.match(r"\w+://", link):
      continue
    target, _, anchor = link.partition("#")
    file = (path.parent / target).resolve() if target else path
    assert file.exists(), f"{path.name}: broken link {link}"
    if anchor and file.suffix == ".md":
      assert anchor in anchors(file), f"{path.name}: no #{anchor} in {file.name}"


def anchors(path: pathlib.Path) -> set[str]:
  """GitHub's heading anchors of a Markdown file."""
  out = set()
  for heading in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M):
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    out.add(slug)
  return out


def test_readme_is_short():
  assert len(README.read_text().splitlines()) < 250


def test_readme_flax_example_runs():
  (block,) = [b for b in python_blocks(README) if "class MyBlock" in b]
  namespace = run_python([block], "README")
  assert "y_BLD" in namespace
