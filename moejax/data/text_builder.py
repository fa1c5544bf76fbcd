"""A TFDS dataset of text documents, written as array_record, read without TensorFlow.

`moejax_text` writes documents (e.g. a carve of `moejax.data.documents`) as a
real TFDS dataset with features `{"text": Text, "domain": Text}` and splits
`train`, `validation` and, when given, `test`, in order (`disable_shuffling=True`);
it is read back with `builder.as_data_source(split)`, by name with
`tfds.data_source("moejax_text", data_dir=...)`, or as `tfds:moejax_text`.
`text:` and `embedded` corpora are streamed from their files instead
(`moejax.data.stream`): TFDS's writer keeps up to 1 GB of examples in memory.
"""

import contextlib
import io
import os
from collections.abc import Callable, Sequence

import tensorflow_datasets as tfds

from moejax.data.documents import Document
from moejax.errors import DataError

NAME = "moejax_text"
SPLITS = ("train", "validation", "test")

# () -> (train, validation, test) documents; an empty test list writes no split.
DocumentsFn = Callable[[], tuple[Sequence[Document], ...]]


class MoejaxText(tfds.core.GeneratorBasedBuilder):
  """Text documents with their domain; `documents_fn` gives (train, validation,
  test)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Text and domain per document; train and validation."}
  # Nothing is downloaded, so there is no checksums file beside the code to find
  # (looking for one needs `importlib_resources`, which is not always installed).
  code_path = None

  def __init__(self, *, documents_fn: DocumentsFn | None = None, **kwargs):
    self._documents_fn = documents_fn
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Documents of a moejax text corpus, tagged with their domain.",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "domain": tfds.features.Text(),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    if self._documents_fn is None:
      raise DataError(
          f"{NAME} in {self.data_dir} is not prepared and has no documents to write; "
          "load it through moejax.data.load_datasets with a text: or embedded source")
    splits = dict(zip(SPLITS, self._documents_fn()))
    return {split: self._generate_examples(docs) for split, docs in splits.items()
            if docs or split != "test"}

  def _generate_examples(self, docs: Sequence[Document]):
    for i, doc in enumerate(docs):
      yield i, {"text": doc.text, "domain": doc.domain}


def prepare(documents_fn: DocumentsFn, data_dir: str | os.PathLike) -> MoejaxText:
  """Writes the dataset under `data_dir` (once: a prepared one is reused), quietly."""
  builder = MoejaxText(documents_fn=documents_fn, data_dir=os.fspath(data_dir))
  tfds.display_progress_bar(False)
  # TFDS prints "Downloading and preparing ..." to stdout on every build.
  with contextlib.redirect_stdout(io.StringIO()):
    builder.download_and_prepare(
        download_dir=os.path.join(os.fspath(data_dir), "downloads"))
  return builder


def data_sources(builder: MoejaxText) -> dict[str, Sequence[dict]]:
  """Random-access array_record readers of every split written (records hold
  bytes)."""
  return {split: builder.as_data_source(split) for split in SPLITS
          if split in builder.info.splits}
