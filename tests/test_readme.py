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


@pytest.mark.parametrize("section", ["Use the MoE layer in your own Flax model"])
def test_readme_example_runs(section):
  blocks = python_blocks(section)
  assert blocks, f"no python example under '{section}'"
  namespace = {}
  for block in blocks:
    exec(compile(block, f"README:{section}", "exec"), namespace)  # pylint: disable=exec-used
  assert "y_BLD" in namespace and "w_in" in namespace  # Both examples ran.
