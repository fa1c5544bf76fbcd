"""The README's code examples run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
  """The ```python blocks under the README heading `section`."""
  text = README.read_text()
  start = text.index(f"## {section}\n")
  end = text.find("\n## ", start + 1)
  body = text[start:end if end != -1 else None]
  return re.findall(r"```python\n(.*?)```", body, flags=re.S)


@pytest.mark.parametrize("section,names", [
    ("Use the MoE layer in your own Flax model", ("y_BLD", "w_in")),
    ("Modern routing: balancing, traces and replay", ("bias_E",)),
])
def test_readme_example_runs(section, names):
  blocks = python_blocks(section)
  assert blocks, f"no python example under '{section}'"
  namespace = {}
  for block in blocks:
    exec(compile(block, f"README:{section}", "exec"), namespace)  # pylint: disable=exec-used
  assert all(n in namespace for n in names)  # Every example ran to its end.
