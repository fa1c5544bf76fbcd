"""English-Spanish verse pairs from Debian's public-domain SWORD Bibles.

Install (Debian/Ubuntu; never needed by the package, the quickstart or the
tests):

  apt-get install -y libsword-utils sword-text-kjv sword-text-sparv

Then

  python experiments/bible_pairs.py --out data/bible

exports the King James Version and the Reina-Valera 1909 with `mod2imp`
(Debian names the modules `engKJV2006eb` / `spaRV1909eb`; `KJV` / `SpaRV`
are tried first), strips their OSIS markup (footnotes and non-canonical
headings dropped with their text, every other tag dropped, its text kept),
pairs the verses that carry the same reference and text in both, drops the
pairs whose lengths differ by more than `--max-ratio` (3, in characters: where
the Reina-Valera's verse division differs from the KJV's, a verse can hold its
neighbours' text, or none), and writes line-aligned files:

  <out>/en.txt, <out>/es.txt             training and validation pairs
  <out>/refs.txt                         the reference of each of their lines
  <out>/test/en.txt, <out>/test/es.txt   every `--test-every`-th pair, held out
  <out>/test/refs.txt

Train on them with `data.source=parallel:<out>/en.txt,<out>/es.txt` and
`data.task=seq2seq` (validation is carved from the pairs by `data.eval_fraction`);
score on `<out>/test/`.
"""

import argparse
import html
import pathlib
import re
import subprocess
import sys
from collections.abc import Iterable

MODULES = {"en": ("KJV", "engKJV2006eb"), "es": ("SpaRV", "spaRV1909eb")}
_NOTE = re.compile(r"<note\b[^>]*?(?<!/)>.*?</note>", re.S)
_TITLE = re.compile(r"<title\b(?P<attrs>[^>]*?)(?<!/)>(?P<text>.*?)</title>", re.S)
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


def parse_imp(text: str) -> dict[str, str]:
  """The entries of a `mod2imp` export: reference -> its raw (marked-up) text,
  in order; the lines of an entry are joined with spaces."""
  out: dict[str, str] = {}
  ref, lines = None, []
  for line in text.splitlines():
    if line.startswith("$$$"):
      if ref is not None:
        out[ref] = " ".join(lines)
      ref, lines = line[3:].strip(), []
    elif ref is not None:
      lines.append(line)
  if ref is not None:
    out[ref] = " ".join(lines)
  return out


def strip_markup(raw: str) -> str:
  """Plain text of an OSIS verse: footnotes and non-canonical titles removed
  with their text, other tags removed, entities decoded, the paragraph mark
  dropped, whitespace collapsed."""
  text = _NOTE.sub(" ", raw)
  text = _TITLE.sub(lambda m: m["text"] if 'canonical="true"' in m["attrs"]
                    else " ", text)
  text = html.unescape(_TAG.sub("", text)).replace("\u00b6", " ")
  return _SPACE.sub(" ", text).strip()


def is_verse(ref: str) -> bool:
  """Whether `ref` ("Book C:V") names a verse (not a book or chapter heading)."""
  m = re.fullmatch(r".+ (\d+):(\d+)", ref)
  return m is not None and int(m[1]) > 0 and int(m[2]) > 0


def align(en: dict[str, str], es: dict[str, str], max_ratio: float = 0.0
          ) -> list[tuple[str, str, str]]:
  """(reference, English, Spanish) of every verse both give text, in the
  English order; texts are stripped, and a verse empty on a side is left out,
  as is one whose side is over `max_ratio` times as long as the other (0: no
  limit)."""
  out = []
  for ref, raw in en.items():
    if not is_verse(ref) or ref not in es:
      continue
    a, b = strip_markup(raw), strip_markup(es[ref])
    if a and b and (not max_ratio
                    or max(len(a), len(b)) <= max_ratio * min(len(a), len(b))):
      out.append((ref, a, b))
  return out


def export(names: Iterable[str]) -> tuple[str, str]:
  """(module name, `mod2imp` output) of the first module that exports."""
  tried = []
  for name in names:
    try:
      done = subprocess.run(["mod2imp", name], capture_output=True, check=False)
    except FileNotFoundError:
      sys.exit("mod2imp not found: apt-get install -y libsword-utils "
               "sword-text-kjv sword-text-sparv")
    text = done.stdout.decode("utf-8", errors="replace")
    if done.returncode == 0 and "$$$" in text:
      return name, text
    tried.append(name)
  sys.exit(f"no SWORD module among {', '.join(tried)}: apt-get install -y "
           "sword-text-kjv sword-text-sparv")


def write_split(folder: pathlib.Path, pairs: list[tuple[str, str, str]]) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  for name, k in (("refs.txt", 0), ("en.txt", 1), ("es.txt", 2)):
    (folder / name).write_text("".join(p[k] + "\n" for p in pairs),
                               encoding="utf-8")


def split_test(pairs: list, every: int) -> tuple[list, list]:
  """(kept, test): pair i is test iff every > 0 and i % every == every - 1."""
  if every <= 0:
    return list(pairs), []
  test = [p for i, p in enumerate(pairs) if i % every == every - 1]
  kept = [p for i, p in enumerate(pairs) if i % every != every - 1]
  return kept, test


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("data/bible"))
  parser.add_argument("--test-every", type=int, default=20,
                      help="hold out every N-th pair as the test split (0: none)")
  parser.add_argument("--max-ratio", type=float, default=3.0,
                      help="drop pairs whose sides differ in length by more (0: "
                      "keep all)")
  args = parser.parse_args(argv)
  (en_name, en_text), (es_name, es_text) = (export(MODULES[k]) for k in ("en", "es"))
  en, es = parse_imp(en_text), parse_imp(es_text)
  both = align(en, es)
  pairs = align(en, es, args.max_ratio) if args.max_ratio else both
  kept, test = split_test(pairs, args.test_every)
  write_split(args.out, kept)
  if test:
    write_split(args.out / "test", test)
  print(f"{len(pairs):,} aligned verse pairs ({en_name} / {es_name}; "
        f"{len(both) - len(pairs)} dropped by --max-ratio): "
        f"{len(kept):,} in {args.out}/{{en,es}}.txt, {len(test):,} in "
        f"{args.out}/test/")


if __name__ == "__main__":
  main()
