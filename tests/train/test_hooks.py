"""The loop's hooks: when each is due, and one fetch of the metrics for all."""

import jax.numpy as jnp
import numpy as np

from moejax.train.hooks import Hook, StepEnd


def test_a_hook_is_due_every_n_steps_and_at_the_last():
  hook = Hook(every=4, action=print)
  due = [s for s in range(1, 11) if hook.due(s, last=s == 10)]
  assert due == [4, 8, 10]


def test_a_hook_every_zero_steps_never_runs():
  hook = Hook(every=0, action=print)
  assert not any(hook.due(s, last=s == 10) for s in range(1, 11))


def test_step_end_fetches_the_metrics_once():
  end = StepEnd(program=None, step=3, state=None,
                metrics={"train/loss": jnp.float32(2.5)}, next_batch=3)
  first = end.host_metrics
  assert isinstance(first["train/loss"], np.ndarray) and first["train/loss"] == 2.5
  assert end.host_metrics is first
