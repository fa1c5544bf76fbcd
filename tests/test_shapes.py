"""Every module's shape letters come from the one glossary, `moejax.shapes`.

A shape suffix is the uppercase tail of a lowercase name (`x_TD`, `w_in_EDF`,
`logits_B1V`: digits are sizes, not letters); shapes are also written in
brackets (`int32[T, K]`) and einsum strings. Each letter a module uses must be
in the glossary and on the module docstring's `Shapes:` line, whose entries
start with the glossary's words for their letter.
"""

import ast
import pathlib
import re

import pytest

from moejax.shapes import GLOSSARY

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "moejax"

STYLE_ORDER = "BLTDFECK"  # STYLE.md item 2: B L T D F E C K, in that order.

_SUFFIX = re.compile(r"(?<![A-Za-z0-9_])_*[a-z][a-z0-9]*(?:_[a-z0-9]+)*"
                     r"_([A-Z][A-Z0-9]*)(?![A-Za-z0-9_])")
# A shape in brackets: `[T, K]`, `int32[B, L+1]`; not a generic (`Optional[X]`).
_BRACKETS = re.compile(r"(\w*)\[([A-Z0-9 ,*+/()-]*[A-Z][A-Z0-9 ,*+/()-]*)\]")
_EINSUM = re.compile(r"einsum\(\s*[\"']([a-z,.\- >]+)[\"']")


def letters_used(source: str) -> dict[str, str]:
  """letter -> the first place it is used (a name, a bracket, an einsum)."""
  used = {}
  for m in _SUFFIX.finditer(source):
    for letter in re.findall(r"[A-Z]", m.group(1)):
      used.setdefault(letter, m.group(0))
  for m in _BRACKETS.finditer(source):
    generic = m.group(1)[:1].isupper()
    if not generic and all(len(run) == 1
                           for run in re.findall(r"[A-Z]+", m.group(2))):
      for letter in re.findall(r"[A-Z]", m.group(2)):
        used.setdefault(letter, m.group(0))
  for m in _EINSUM.finditer(source):
    for letter in re.findall(r"[a-z]", m.group(1)):
      used.setdefault(letter.upper(), m.group(0))
  return used


def _split_top_level(text: str) -> list[str]:
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if ch == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  return parts + [text[start:]]


def _first_sentence(text: str) -> str:
  depth = 0
  for i, ch in enumerate(text):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if ch == "." and depth == 0 and text[i + 1:i + 2] in ("", " "):
      return text[:i]
  return text


def shapes_line(docstring: str | None) -> dict[str, str] | None:
  """letter -> meaning from the docstring's `Shapes:` paragraph (None if none)."""
  lines = (docstring or "").splitlines()
  for i, line in enumerate(lines):
    if line.startswith("Shapes:"):
      paragraph = [line[len("Shapes:"):]]
      for more in lines[i + 1:]:
        if not more.strip():
          break
        paragraph.append(more)
      text = _first_sentence(" ".join(p.strip() for p in paragraph).strip())
      declared = {}
      for entry in _split_top_level(text):
        m = re.fullmatch(r"\s*([A-Z])\s+(\S.*?)\s*", entry)
        if not m:
          raise ValueError(f"Shapes entry {entry.strip()!r} is not "
                           "'<letter> <meaning>'")
        if m.group(1) in declared:
          raise ValueError(f"Shapes declares {m.group(1)} twice")
        declared[m.group(1)] = m.group(2)
      return declared
  return None


def _means(meaning: str, words: str) -> bool:
  return (meaning.lower().startswith(words.lower())
          and not meaning[len(words):len(words) + 1].isalnum())


def problems(source: str) -> list[str]:
  """What breaks the glossary in one module's source (empty: nothing)."""
  try:
    declared = shapes_line(ast.get_docstring(ast.parse(source)))
  except ValueError as e:
    return [str(e)]
  found = []
  for letter, meaning in (declared or {}).items():
    if letter not in GLOSSARY:
      found.append(f"Shapes declares {letter}, which the glossary lacks")
    elif not _means(meaning, GLOSSARY[letter]):
      found.append(f"Shapes gives {letter} as {meaning!r}; the glossary's "
                   f"{letter} is {GLOSSARY[letter]!r}")
  for letter, where in sorted(letters_used(source).items()):
    if letter not in GLOSSARY:
      found.append(f"{where} uses {letter}, which the glossary lacks")
    elif declared is None:
      found.append(f"{where} uses {letter} but the docstring has no Shapes line")
    elif letter not in declared:
      found.append(f"{where} uses {letter}, not on the Shapes line")
  return found


def _modules():
  return sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py"))


def test_glossary_starts_with_style_letters_and_gives_one_meaning_each():
  assert "".join(GLOSSARY)[:len(STYLE_ORDER)] == STYLE_ORDER
  assert all(re.fullmatch(r"[A-Z]", letter) for letter in GLOSSARY)
  assert len(set(GLOSSARY.values())) == len(GLOSSARY)
  # No meaning is the start of another's, so no entry can match two letters.
  for a, words_a in GLOSSARY.items():
    for b, words_b in GLOSSARY.items():
      assert a == b or not _means(words_b, words_a), (a, b)


def test_glossary_docstring_lists_the_dict_in_order():
  import moejax.shapes
  listed = re.findall(r"^  ([A-Z])  (.+)$", moejax.shapes.__doc__, re.M)
  assert [letter for letter, _ in listed] == list(GLOSSARY)
  for letter, text in listed:
    assert _means(text, GLOSSARY[letter]), (letter, text)


@pytest.mark.parametrize("module", [m for m in _modules() if m != "shapes.py"])
def test_module_uses_only_declared_glossary_letters(module):
  assert problems((PACKAGE / module).read_text()) == []


def test_checker_catches_each_kind_of_slip():
  good = '"""Doc.\n\nShapes: T tokens of one device, D model width.\n"""\nx_TD = 1\n'
  assert problems(good) == []
  # An undeclared letter, no Shapes line, a letter given another meaning; in
  # names, brackets and einsums; digits in a suffix; a malformed entry.
  assert problems(good + "y_Tx = 2\n") == []  # Lowercase: not a shape.
  assert "uses K, not on the Shapes line" in problems(
      good + "mask_TK = 2\n")[0]
  assert "no Shapes line" in problems('"""Doc."""\nx_TD = 1\n')[0]
  assert "glossary's D is 'model width'" in problems(
      good.replace("D model width", "D devices"))[0]
  assert "uses K" in problems(good + '"""int32[T, K]"""\n')[0]
  assert "uses E" in problems(good + 'jnp.einsum("td,de->te", a, b)\n')[0]
  assert "uses V" in problems(good + "logits_T1V = 0\n")[0]
  assert "uses K" in problems(good + "def _gmm(token_ids_TK): pass\n")[0]
  assert problems(good + '"""Optional[K]"""\n') == []  # A generic, not a shape.
  assert problems(good.replace("width.", "width. Prose, after it.")) == []
  assert "not '<letter> <meaning>'" in problems(
      good.replace("D model width", "D=model width"))[0]
