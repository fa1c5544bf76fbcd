"""The routing-fluctuation probe of a run: held-out tokens (the first eval
batch) routed at every probe step, their routes saved and compared, and with
`train.replay_routes` replayed to measure the loss under recorded routes."""

from typing import Any

from etils import epath

from moejax import layout
from moejax.metrics.fluctuation import FluctuationProbe
from moejax.metrics.trace import ReplayReference
from moejax.parallel import hosts
from moejax.routing.replay import replay_variables
from moejax.train.inputs import model_inputs
from moejax.train.program import StageProgram
from moejax.train.state import TrainState


class RouteProbe:
  """Routes the probe tokens of `data` on demand; `fluctuation` keeps their
  routes under `<workdir>/probes/` (written only when `enabled`)."""

  def __init__(self, workdir: epath.Path, data, replay_routes: str, *,
               enabled: bool, save_inputs: bool):
    self.fluctuation = FluctuationProbe(workdir, enabled=enabled)
    self.batch = model_inputs(data.eval_batches[0])
    self.replay = ReplayReference(replay_routes, self.fluctuation.dir)
    if save_inputs and "domains" in data.eval_batches[0]:
      self.fluctuation.save_inputs(self.batch["inputs"],
                                   data.eval_batches[0]["domains"],
                                   data.domain_names)

  def __call__(self, program: StageProgram, state: TrainState, step: int
               ) -> dict[str, Any]:
    """Saves the routes at `step`; returns the fluctuation metrics, the probe
    loss and, with a replay reference, the probe loss under its routes."""
    out = hosts.fetch(program.probe(state.variables(), self.batch))
    row = {"probe/loss": float(out["loss"]),
           **self.fluctuation.record(step, out["routes"], out["trace"])}
    self.replay.observe(out["trace"])
    reference = self.replay.trace()
    if reference is not None:
      variables = {**state.variables(), **layout.to_model(
          replay_variables(reference), program.stage.model)}
      replayed = program.probe(variables, self.batch)
      row["probe/replay_loss"] = float(hosts.fetch(replayed["loss"]))
    return row
