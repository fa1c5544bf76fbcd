"""The training state pytree (step, params, optimizer state, model state) and
the logical axis names of its leaves.

Shapes: B batch, L length.
"""

import flax
import flax.linen as nn
import jax
import optax
from jax.sharding import PartitionSpec as P

from moejax.train.inputs import example_inputs


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


def state_specs(model: nn.Module, tx: optax.GradientTransformation,
                seq_len: int, target_len: int | None = None) -> TrainState:
  """The logical PartitionSpec of every leaf of the train state.

  Params take the axis names the model gives them (`nn.with_logical_partitioning`);
  the optimizer's copies of the params (Adam moments) take their param's names
  (`optax.tree_map_params`); the model is initialised on zero ids of
  `seq_len` (an encoder-decoder's target: `target_len`). Everything else (step, counts, the model state's
  unnamed variables) is replicated (P()).
  """
  boxed = jax.eval_shape(model.init, jax.random.key(0),
                         *example_inputs(model.config, seq_len, target_len))
  specs = dict(nn.get_partition_spec(boxed))
  params = specs.pop("params")
  abstract_opt = jax.eval_shape(tx.init, nn.unbox(boxed)["params"])
  opt_state = optax.tree_map_params(
      tx, lambda _, spec: spec, abstract_opt, params,
      transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P))
  return TrainState(step=P(), params=params, opt_state=opt_state,
                    model_state=specs)
