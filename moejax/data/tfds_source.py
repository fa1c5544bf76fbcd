"""`tfds:<name>[:split]`: a prepared TFDS dataset, read as array_record (no TensorFlow).

- text: the feature named `text`, else the first string feature (Text or string Tensor);
- domain: a feature named `domain` (Text, string or ClassLabel), else the dataset name;
- held out: the `validation` split, else `test`, else carved from the training split
  by the chunk-stride rule of `moejax.data.documents`;
- test (`data.test_fraction` > 0): the `test` split when validation is another
  split, else carved from the training split by the same rule;
- `data.max_bytes` caps the training split; a held-out split is capped at
  `max_bytes * eval_fraction` (test: `max_bytes * test_fraction`).
Records are streamed (read as they are iterated, chunked and carved on the fly:
`moejax.data.stream`), so memory does not grow with the dataset.
"""

import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from moejax.data import documents as docs_lib
from moejax.data import stream
from moejax.data.config import DataConfig
from moejax.data.corpus import Corpus, RecordDocuments, corpus_key
from moejax.errors import DataError

_HELD_OUT_SPLITS = ("validation", "test")


class Reiterable(Iterable):
  """Documents that `make()` streams afresh on each iteration."""

  def __init__(self, make: Callable[[], Iterator]):
    self._make = make

  def __iter__(self) -> Iterator:
    return self._make()


def is_string(feature) -> bool:
  if isinstance(feature, tfds.features.Text):
    return True
  return (isinstance(feature, tfds.features.Tensor) and feature.shape == ()
          and np.dtype(feature.np_dtype) == np.dtype(object))


def text_feature(features: tfds.features.FeaturesDict, name: str) -> str:
  """The name of the text feature: `text`, else the first string feature."""
  if "text" in features and is_string(features["text"]):
    return "text"
  for key, feature in features.items():
    if is_string(feature):
      return key
  raise DataError(f"TFDS dataset {name!r} has no text feature (features: "
                  f"{', '.join(features.keys())}); use a dataset with a Text feature")


def domain_getter(features: tfds.features.FeaturesDict,
                  default: str) -> Callable[[dict], str]:
  """Maps a record to its domain name: the `domain` feature, else `default`."""
  if "domain" not in features:
    return lambda record: default
  feature = features["domain"]
  if isinstance(feature, tfds.features.ClassLabel):
    return lambda record: feature.int2str(int(record["domain"]))
  return lambda record: (record["domain"].decode("utf-8")
                         if isinstance(record["domain"], bytes)
                         else str(record["domain"]))


def data_source(name: str, split: str, data_dir: str | None):
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except (ValueError, NotImplementedError, KeyError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f"cannot read split {split!r} of TFDS dataset {name!r} as "
                    f"array_record ({first}); prepare it with file_format=array_record"
                    ) from None


def prepared_builder(name: str, data_dir: str | None):
  """The builder of TFDS dataset `name`, prepared in `data_dir`; else a DataError."""
  where = data_dir or "the TFDS default data_dir"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    raise DataError(f"TFDS dataset {name!r} not found in {where}; check the name or "
                    "set data.tfds_data_dir to where it was prepared") from None
  if not builder.is_prepared():
    raise DataError(f"TFDS dataset {name!r} is not prepared in {where}; run `tfds "
                    f"build {name} --file_format=array_record` or set "
                    "data.tfds_data_dir")
  return builder


def open_tfds(name: str, split: str, cfg: DataConfig) -> Corpus:
  """The documents of a prepared TFDS dataset `name`, `split` for training."""
  builder = prepared_builder(name, cfg.tfds_data_dir)
  info = builder.info
  text_key = text_feature(info.features, name)
  domain_of = domain_getter(info.features, builder.name)
  source = f"tfds:{name}:{split}"
  train = RecordDocuments(data_source(name, split, cfg.tfds_data_dir), text_key,
                          domain_of, source)
  held_out = next((s for s in _HELD_OUT_SPLITS if s in info.splits and s != split),
                  None)
  train_docs = capped_train = Reiterable(lambda: stream.capped(train, cfg.max_bytes))

  def held_docs(held: str, fraction: float):
    records = RecordDocuments(data_source(name, held, cfg.tfds_data_dir), text_key,
                              domain_of, f"tfds:{name}:{held}")
    cap = None if cfg.max_bytes is None else math.ceil(cfg.max_bytes * fraction)
    return Reiterable(lambda: stream.capped(records, cap))

  def carved(eval_fraction, test_fraction=0.0):
    return stream.Carved(lambda: stream.document_chunks(capped_train), eval_fraction,
                         test_fraction)

  test_docs, test_split = (), None
  if next(iter(train_docs), None) is None:
    raise DataError(f"TFDS dataset {name!r} split {split!r} has no text; "
                    "pick another split or dataset in data.source")
  if held_out is None:
    whole = carved(cfg.eval_fraction, cfg.test_fraction)
    valid_docs = whole.split("validation")
    test_docs = whole.split("test") if cfg.test_fraction else ()
    train_docs = whole.split("train")
  else:
    valid_docs = held_docs(held_out, cfg.eval_fraction)
    if (cfg.test_fraction and held_out == "validation" and "test" in info.splits
        and split != "test"):
      test_split = "test"
      test_docs = held_docs("test", cfg.test_fraction)
    elif cfg.test_fraction:
      rest = carved(cfg.test_fraction)
      train_docs, test_docs = rest.split("train"), rest.split("validation")
  splits = {s: info.splits[s].num_examples for s in info.splits}
  parts = ("tfds", name, split, held_out, str(builder.data_dir),
           str(builder.version), splits, text_key, cfg.max_bytes,
           cfg.eval_fraction, docs_lib.CHUNK_BYTES)
  if cfg.test_fraction:  # Keys without a test split are unchanged.
    parts += (("test", test_split, cfg.test_fraction),)
  return Corpus(cfg.source, corpus_key(*parts), train_docs, valid_docs, test_docs)
