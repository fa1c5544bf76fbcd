"""`moejax-sample --workdir DIR --prompt TEXT [--max_new_tokens N] [--temperature T]
[--top_p P] [--seed S] [--step N] [--num_samples K] [--show_experts [--layer I]]
[--config.<key>=<value> ...]`: text from a trained run.

Prints the prompt and its continuation; with --show_experts, every token with
the expert that served it in MoE block --layer (colours on a terminal). The
run's config.json is the config; --config.mesh.* picks the devices.
"""

import sys

from absl import flags

from moejax import cli_config

_CONFIG = cli_config.define_config_flag(
    "The run's config (default: <workdir>/config.json); override keys with "
    "--config.<key>=<value>.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A run's directory.")
_PROMPT = flags.DEFINE_string("prompt", "", "Text to continue.")
_MAX_NEW = flags.DEFINE_integer(
    "max_new_tokens", None, "Tokens to generate (default: as many as fit the "
    "model's length, at most 200).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature "
                                  "(0: greedy).")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass (1: off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (same seed, same text).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Continuations to draw.")
_SHOW_EXPERTS = flags.DEFINE_bool("show_experts", False, "Mark each token with "
                                  "the expert that served it.")
_LAYER = flags.DEFINE_integer("layer", None, "MoE block for --show_experts "
                              "(default: the first).")


def _main(argv) -> None:
  del argv
  from moejax.errors import MoejaxError  # pylint: disable=g-import-not-at-top
  from moejax.sample import annotate, sample  # pylint: disable=g-import-not-at-top
  try:
    trained = cli_config.load_run(
        _CONFIG, _WORKDIR.value, _STEP.value,
        "moejax-sample --workdir /tmp/run --prompt 'def main('")
    samples = sample(trained, _PROMPT.value, max_new_tokens=_MAX_NEW.value,
                     temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                     seed=_SEED.value, num_samples=_NUM_SAMPLES.value)
    colour = sys.stdout.isatty()
    for i, s in enumerate(samples):
      if len(samples) > 1:
        print(f"--- sample {i} (step {trained.step}, seed {_SEED.value})")
      if _SHOW_EXPERTS.value:
        print(annotate(s, trained.tokenizer, layer=_LAYER.value, colour=colour))
      else:
        print(s.prompt + s.text)
  except MoejaxError as e:
    sys.exit(f"moejax: error: {e}")


def main() -> None:
  """Console entry point."""
  cli_config.run(_main, __name__, on_trained_run=True)


if __name__ == "__main__":
  main()
