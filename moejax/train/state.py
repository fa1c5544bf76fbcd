"""The training state pytree: step, params, optimizer state, model state."""

import flax
import jax


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; checkpointed whole.

  Attributes:
    step: int32[] number of optimizer updates applied.
    params: the model params (plain nested dicts).
    opt_state: the optax state of those params.
    model_state: the model's other Flax variable collections (for instance a
      hash router's `constants`), read by every apply and never trained.
  """

  step: jax.Array
  params: dict
  opt_state: object
  model_state: dict

  def variables(self, params=None) -> dict:
    """The Flax variables for `model.apply`: params plus the model state."""
    return {"params": self.params if params is None else params,
            **self.model_state}
