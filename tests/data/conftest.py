"""Fixtures of the data tests: a folder of small real text files and its config."""

import pathlib

import pytest

from moejax.data import DataConfig
from tests.data.corpora import small_config, write_corpus


@pytest.fixture
def corpus_dir(tmp_path) -> pathlib.Path:
  """A folder holding the three small text files."""
  write_corpus(tmp_path / "corpus")
  return tmp_path / "corpus"


@pytest.fixture
def text_config(corpus_dir) -> DataConfig:
  """`text:<corpus_dir>/*.txt` with the small sizes."""
  return small_config(f"text:{corpus_dir}/*.txt")
