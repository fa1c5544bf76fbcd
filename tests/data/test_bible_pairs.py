"""experiments/bible_pairs.py: markup stripping and verse alignment on an inline
sample; the real export only where the SWORD tools are installed."""

import shutil
import subprocess

import pytest

from experiments import bible_pairs
from moejax.data import parallel

EN = """$$$[ Module Heading ]
$$$Genesis 0:0
<div osisID="Gen" type="book"/><title type="main">The First Book of Moses</title>
$$$Genesis 1:1
In the <w lemma="strong:H7225">beginning</w> God created &amp; made.<note placement="foot"><reference type="annotateRef">1.1 </reference>Heb. a note</note>
$$$Genesis 1:2
<div type="x-milestone" sID="pv1"/>\u00b6 And the <transChange type="added">earth</transChange>
was void.
$$$Psalms 3:1
<title canonical="true" type="psalm">A Psalm of David.</title> <l level="1" sID="x"/>LORD, how many!<title>A heading</title>
$$$Psalms 3:2
Only in English.
"""
ES = """$$$Genesis 1:1
<w lemma="strong:H7225">EN el principio</w> crió Dios.
$$$Genesis 1:2
Y la
$$$Psalms 3:1
<title canonical="true" type="psalm">Salmo de David.</title> ¡OH Jehová!
$$$Psalms 3:2
<div sID="a"/>
"""


def test_markup_is_stripped_and_verses_align_by_reference():
  en, es = bible_pairs.parse_imp(EN), bible_pairs.parse_imp(ES)
  assert list(en)[:3] == ["[ Module Heading ]", "Genesis 0:0", "Genesis 1:1"]
  assert bible_pairs.align(en, es) == [
      ("Genesis 1:1", "In the beginning God created & made.",
       "EN el principio crió Dios."),
      ("Genesis 1:2", "And the earth was void.", "Y la"),
      ("Psalms 3:1", "A Psalm of David. LORD, how many!",
       "Salmo de David. ¡OH Jehová!"),
  ]  # Headings (:0), an empty side and a one-sided verse are left out.
  # A side over 3x as long as the other (a shifted verse division) is dropped.
  assert [p[0] for p in bible_pairs.align(en, es, 3.0)] == ["Genesis 1:1",
                                                            "Psalms 3:1"]
  kept, test = bible_pairs.split_test(list(range(10)), 4)
  assert test == [3, 7] and kept == [0, 1, 2, 4, 5, 6, 8, 9]


def _has_modules() -> bool:
  if shutil.which("mod2imp") is None:
    return False
  return all(any(b"$$$" in subprocess.run(["mod2imp", n], capture_output=True,
                                          check=False).stdout[:4096]
                 for n in names) for names in bible_pairs.MODULES.values())


def test_real_bibles_give_aligned_files(tmp_path):
  if not _has_modules():
    pytest.skip("SWORD tools or Bibles not installed")
  bible_pairs.main(["--out", str(tmp_path), "--test-every", "20"])
  corpus = parallel.ParallelCorpus(
      f"parallel:{tmp_path}/en.txt,{tmp_path}/es.txt", 0.05, 0.0)
  test = parallel.ParallelCorpus(
      f"parallel:{tmp_path}/test/en.txt,{tmp_path}/test/es.txt", 0.05, 0.0)
  assert corpus.num_pairs + test.num_pairs > 30_000
  refs = (tmp_path / "refs.txt").read_text().splitlines()
  first = next(corpus.pairs())
  assert refs[0] == "Genesis 1:1" and first.source.startswith("In the beginning")
  assert first.target.startswith("EN el principio")
  text = (tmp_path / "en.txt").read_text() + (tmp_path / "es.txt").read_text()
  assert "<" not in text and ">" not in text
