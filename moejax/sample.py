"""Text from a trained run, with the expert that served each token.

`sample(trained, prompt, ...)` continues a prompt with the checkpoint in
`trained` (`moejax.train.trained.load_trained`); `annotate(...)` marks each
token with its expert in one MoE block, in colour on a terminal. The
`moejax-sample` command (`moejax.cli_sample`) prints both.

Shapes: B batch rows, Y steps (one generated token each).
"""

import dataclasses

import jax
import numpy as np

from moejax.errors import ConfigError
from moejax.models.decode import Decoder
from moejax.train.trained import Trained

EOS_ID = 3  # moejax.data.tokenizer.EOS_ID (that module loads SentencePiece lazily).
DEFAULT_MAX_NEW_TOKENS = 200
# Background colours of the 256-colour terminal palette, one per expert.
_ANSI_BACKGROUNDS = (153, 217, 187, 223, 183, 152, 230, 210, 117, 229, 159, 225,
                     194, 216, 189, 158)


@dataclasses.dataclass(frozen=True)
class Sample:
  """One generated continuation.

  Attributes:
    prompt: the prompt text.
    text: the generated text (up to, without, the first EOS).
    tokens: ids of the prompt (after a leading EOS: a document starts after
      one) and of the generated text.
    prompt_tokens: how many of `tokens` are the prompt's (with the EOS).
    experts: `layer_<i>` -> the top expert of each of `tokens` in MoE block i.
  """

  prompt: str
  text: str
  tokens: tuple[int, ...]
  prompt_tokens: int
  experts: dict[str, tuple[int, ...]]


def token_text(tokenizer, token: int) -> str:
  """The text of one token: pieces show their spaces, byte pieces their bytes."""
  if tokenizer.is_byte(token) or tokenizer.is_control(token):
    return tokenizer.decode([token])
  return tokenizer.id_to_piece(token).replace("\u2581", " ")


def sample(trained: Trained, prompt: str, *, max_new_tokens: int | None = None,
           temperature: float = 0.8, top_p: float = 0.95, seed: int = 0,
           num_samples: int = 1, decoder: Decoder | None = None) -> list[Sample]:
  """`num_samples` continuations of `prompt` by the checkpoint in `trained`.

  max_new_tokens None: as many as fit the model's max_len, at most 200. The
  same seed gives the same text. `decoder` (a `Decoder` of the same model)
  reuses compiled programs across calls.
  """
  if trained.model_config.arch == "encdec":
    raise ConfigError("this run is an encoder-decoder: it translates a source "
                      "rather than continuing a prompt; use moejax-translate "
                      f"--workdir {trained.workdir}")
  tokenizer = trained.tokenizer
  prompt_ids = [EOS_ID] + list(tokenizer.encode(prompt))
  room = trained.model_config.max_len - len(prompt_ids)
  if room < 1:
    raise ConfigError(
        f"the prompt is {len(prompt_ids) - 1} tokens; the model reads at most "
        f"{trained.model_config.max_len - 2} before generating; shorten it")
  steps = min(room, DEFAULT_MAX_NEW_TOKENS) if max_new_tokens is None else (
      max_new_tokens)
  if num_samples < 1:
    raise ConfigError(f"num_samples={num_samples} must be at least 1")
  decoder = decoder or Decoder(trained.model_config, mesh=trained.mesh)
  out = decoder.generate(
      trained.variables, np.tile(np.asarray(prompt_ids, np.int32), (num_samples, 1)),
      max_new_tokens=steps, key=jax.random.key(seed), temperature=temperature,
      top_p=top_p)
  samples = []
  for row in range(num_samples):
    new = [int(t) for t in out.tokens_BY[row]]
    if EOS_ID in new:
      new = new[:new.index(EOS_ID)]
    length = len(prompt_ids) + len(new)
    samples.append(Sample(
        prompt=prompt, text=_continuation(tokenizer, prompt_ids[1:], new),
        tokens=tuple(prompt_ids + new), prompt_tokens=len(prompt_ids),
        experts={k: tuple(int(e) for e in v[row, :length])
                 for k, v in out.experts.items()}))
  return samples


def _continuation(tokenizer, prompt_ids: list[int], new: list[int]) -> str:
  """The text `new` adds after the prompt (a piece may open with a space that
  decoding `new` alone would drop)."""
  head = tokenizer.decode(prompt_ids)
  whole = tokenizer.decode(prompt_ids + new)
  return whole[len(head):] if whole.startswith(head) else tokenizer.decode(new)


def _layer_key(sample_: Sample, layer: int | None) -> str:
  if not sample_.experts:
    raise ConfigError("this model has no MoE block: no experts to show")
  if layer is None:
    return min(sample_.experts, key=lambda k: int(k.split("_")[1]))
  key = f"layer_{layer}"
  if key not in sample_.experts:
    blocks = ", ".join(k.split("_")[1] for k in sorted(sample_.experts))
    raise ConfigError(f"block {layer} is not an MoE block; MoE blocks: {blocks}")
  return key


def annotate(sample_: Sample, tokenizer, *, layer: int | None = None,
             colour: bool = False) -> str:
  """The prompt and text with each token's expert in MoE block `layer` (default:
  the first): a background colour per expert, or `token⟨e⟩` without colour."""
  key = _layer_key(sample_, layer)
  parts = [f"[{key}: expert per token]"]
  if colour:
    parts.append(" ".join(
        f"\x1b[48;5;{_ANSI_BACKGROUNDS[e % len(_ANSI_BACKGROUNDS)]}m\x1b[30m "
        f"{e} \x1b[0m" for e in range(max(sample_.experts[key]) + 1)))
  parts.append("\n")
  for i, (token, expert) in enumerate(zip(sample_.tokens, sample_.experts[key])):
    if i == 0:
      continue  # The leading EOS is not the user's text.
    text = token_text(tokenizer, token)
    if i == 1:
      text = text.removeprefix(" ")  # SentencePiece's space before the text.
    if colour:
      back = _ANSI_BACKGROUNDS[expert % len(_ANSI_BACKGROUNDS)]
      lines = text.split("\n")  # Colour stops at line ends.
      parts.append("\n".join(f"\x1b[48;5;{back}m\x1b[30m{t}\x1b[0m" if t else ""
                             for t in lines))
    else:
      parts.append(f"{text.replace(chr(10), chr(0x21b5))}\u27e8{expert}\u27e9"
                   + "\n" * text.count("\n"))
    if i == sample_.prompt_tokens - 1:
      parts.append("\u2502" if not colour else "\x1b[1m\u2502\x1b[0m")
  return "".join(parts)

