"""The experiment config (ml_collections) and its typed, validated form.

`default_config()` lists every key with its default; `configs/*.py` start from it
and override. `parse(config)` checks every value and returns a `RunConfig` of
frozen dataclasses: the ConfigDict stops here and never reaches the library.

Stages: `config.stages` is a list of `stage_config(...)` entries; each trains the
base `config.model` with its own overrides for a number of steps (or a fraction
of `train.steps`; one stage may take the remainder), optionally applying a
registered transform on entry and freezing params by path rules. An empty list
is one stage, `train`, of `train.steps` steps.
"""

import copy
import dataclasses
import math
import os
import re
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from moejax.data.config import DataConfig
from moejax.errors import ConfigError
from moejax.kernels import check_impl
from moejax.models.config import (ARCHS, DTYPES, REMAT_POLICIES, MoEConfig,
                                  TransformerConfig,
                                  active_ffn_flops_per_token, expert_width,
                                  resolve_moe_layers)
from moejax.models.sizes import apply_size
from moejax.moe.dispatch import DISPATCH_PATHS
from moejax.moe.experts import check_depth
from moejax.moe.ffn_init import DEFAULT_FFN_INIT, FFN_INITS
from moejax.parallel.mesh import MeshConfig
from moejax.routing.registry import check_router
from moejax.stages.stage import Stage
from moejax.stages.transforms import get_transition
from moejax.train.optimizer import SCHEDULES, OptimizerConfig


# (model.arch, data.task) pairs the trainer runs: the decoder on next-token
# windows, the encoder on masked-LM batches (`moejax.data.mlm`), the
# encoder-decoder on packed seq2seq rows (`moejax.data.seq2seq`).
TRAINED_ARCHS = (("decoder", "lm"), ("encoder", "mlm"), ("encdec", "seq2seq"))
# `model.encoder_moe_layers` default: the encoder stack takes `model.moe_layers`'
# placement, resolved over its own depth.
SAME_PLACEMENT = "same"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Loop settings: length, batch, and how often to log, evaluate and save.

  Attributes:
    probe_every: steps between routing-fluctuation probes (0: off).
    init_from: workdir of a finished run whose params the first stage starts
      from (its transform, e.g. `upcycle`, maps them to the new model).
    replay_routes: at every probe, also route the probe tokens by a recorded
      trace and log their loss as `probe/replay_loss` (`first`: this run's
      first probe; or a `probes/trace_<step>.npz` path; "": off).
    grad_accum_steps: k micro-batches of batch_size / k sequences per
      optimizer step, their gradients accumulated in the step
      (`moejax.train.accumulate`); 1: none.
    label_smoothing: eps of the training loss's smoothed targets (fairseq's
      `label_smoothed_cross_entropy`, 0.1 in its translation recipes); 0:
      plain cross-entropy. Evaluation reports the plain cross-entropy.
  """

  steps: int = 400
  batch_size: int = 16
  log_every: int = 10
  eval_every: int = 100
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  seed: int = 0
  probe_every: int = 50
  init_from: str = ""
  replay_routes: str = ""
  grad_accum_steps: int = 1
  label_smoothing: float = 0.0


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything one `moejax-train` run needs, validated."""

  model: TransformerConfig
  data: DataConfig
  train: TrainConfig
  optim: OptimizerConfig
  stages: tuple[Stage, ...] = ()
  mesh: MeshConfig = MeshConfig()

  def to_json(self) -> dict[str, Any]:
    """The config as written to config.json, plus `derived`: what follows from
    it (each stage's active FFN FLOPs per token, forward)."""
    flops = {st.name: active_ffn_flops_per_token(st.model) for st in self.stages}
    return {**dataclasses.asdict(self),
            "derived": {"active_ffn_flops_per_token": flops}}


def stage_config(name: str, *, steps: int = 0, fraction: float = 0.0,
                 model: dict | None = None, frozen: tuple[str, ...] = (),
                 transform: str = "", transform_options: dict | None = None
                 ) -> ml_collections.ConfigDict:
  """One entry of `config.stages` (every key present, so each can be overridden
  on the command line as `--config.stages[i].<key>=...`)."""
  return ml_collections.ConfigDict(dict(
      name=name, steps=steps, fraction=fraction,
      model=ml_collections.ConfigDict(model or {}), frozen=list(frozen),
      transform=transform,
      transform_options=ml_collections.ConfigDict(transform_options or {})))


# The sections of default_config() that are a typed dataclass, key for key.
TYPED_SECTIONS = {"data": DataConfig, "train": TrainConfig,
                  "optim": OptimizerConfig, "mesh": MeshConfig}


def optional_type(hint: Any) -> type | None:
  """X for an annotation `X | None` (or Optional[X]); None for any other."""
  args = typing.get_args(hint)
  if type(None) not in args:
    return None
  rest = [a for a in args if a is not type(None)]
  return rest[0] if len(rest) == 1 else object


def _section(cls) -> ml_collections.ConfigDict:
  """The defaults of dataclass `cls`; a field that may be None is a typed
  reference, so it keeps its type once set to None (and back)."""
  values = {}
  for f in dataclasses.fields(cls):
    value, base = getattr(cls(), f.name), optional_type(f.type)
    values[f.name] = (value if base is None else
                      config_dict.FieldReference(value, field_type=base))
  return ml_collections.ConfigDict(values)


def default_config() -> ml_collections.ConfigDict:
  """Every public key with its default (a small MoE LM on the embedded corpus)."""
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(
      num_layers=4, d_model=128, num_heads=4, d_ff=512, dtype="float32",
      moe_layers="every_other", num_experts=8, top_k=1, router="switch",
      router_options=ml_collections.ConfigDict(), dispatch="capacity",
      capacity_factor=1.25, expert_d_ff=config_dict.placeholder(int),
      equal_flops=True, matmul="xla", size="", num_shared_experts=0,
      expert_depth=1, ffn_init=DEFAULT_FFN_INIT, scan_layers=False,
      remat="none", arch="decoder",
      num_encoder_layers=config_dict.placeholder(int),
      encoder_moe_layers=SAME_PLACEMENT, share_embeddings=True))
  for name, cls in TYPED_SECTIONS.items():
    c[name] = _section(cls)
  c.stages = []
  c.lock()
  c.model.router_options.unlock()  # Options differ per router.
  return c


def nullable_keys() -> tuple[str, ...]:
  """`<section>.<key>` of every default_config() key that may be None: the
  fields of the typed sections annotated `X | None`, and the model keys whose
  default is None."""
  keys = [f"{name}.{f.name}" for name, cls in TYPED_SECTIONS.items()
          for f in dataclasses.fields(cls) if optional_type(f.type)]
  model = default_config().model
  return tuple(keys + [f"model.{k}" for k, v in model.items() if v is None])


def _positive(section: str, values: dict[str, Any], keys: tuple[str, ...]) -> None:
  for key in keys:
    v = values[key]
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ConfigError(f"{section}.{key} must be a positive integer, got {v!r}")


def _choice(key: str, value: str, valid: tuple[str, ...]) -> None:
  if value not in valid:
    raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(valid)}")


def _model(m: dict[str, Any], data: DataConfig) -> TransformerConfig:
  m = apply_size(m, default_config().model.to_dict())
  _positive("model", m, ("num_layers", "d_model", "num_heads", "d_ff",
                         "num_experts", "top_k"))
  _choice("model.dtype", m["dtype"], DTYPES)
  _choice("model.dispatch", m["dispatch"], DISPATCH_PATHS)
  _choice("model.ffn_init", m["ffn_init"], FFN_INITS)
  _choice("model.remat", m["remat"], REMAT_POLICIES)
  _choice("model.arch", m["arch"], ARCHS)
  if (m["arch"], data.task) not in TRAINED_ARCHS:
    raise ConfigError(
        f"model.arch={m['arch']!r} with data.task={data.task!r}: moejax-train "
        "trains " + ", ".join(f"arch={a!r} on task={t!r}" for a, t in
                              TRAINED_ARCHS) + " so far")
  if not isinstance(m["scan_layers"], bool):
    raise ConfigError(f"model.scan_layers must be True or False, got "
                      f"{m['scan_layers']!r}")
  if m["d_model"] % m["num_heads"]:
    raise ConfigError(f"model.d_model={m['d_model']} is not divisible by "
                      f"model.num_heads={m['num_heads']}")
  if not m["capacity_factor"] > 0:
    raise ConfigError(f"model.capacity_factor must be > 0, got {m['capacity_factor']}")
  if m["expert_d_ff"] is not None:
    _positive("model", m, ("expert_d_ff",))
  shared = m["num_shared_experts"]
  if not isinstance(shared, int) or isinstance(shared, bool) or shared < 0:
    raise ConfigError(f"model.num_shared_experts must be an integer >= 0, got "
                      f"{shared!r}")
  check_depth(m["expert_depth"])
  check_impl(m["matmul"])
  moe_layers = resolve_moe_layers(m["moe_layers"], m["num_layers"])
  encoder_moe_layers = _encoder_placement(m)
  options = dict(m["router_options"])
  if moe_layers or encoder_moe_layers:
    check_router(m["router"], num_experts=m["num_experts"], top_k=m["top_k"],
                 options=options, dispatch=m["dispatch"])
  moe = MoEConfig(
      num_experts=m["num_experts"], top_k=m["top_k"], router=m["router"],
      router_options=tuple(sorted(options.items())), dispatch=m["dispatch"],
      capacity_factor=float(m["capacity_factor"]),
      # Unset: equal active FLOPs with the dense FFN (`model.equal_flops`;
      # fine-grained and shared experts included).
      d_ff=(expert_width(m["d_ff"], top_k=m["top_k"], expert_d_ff=m["expert_d_ff"],
                         equal_flops=bool(m["equal_flops"]), num_shared=shared)
            if moe_layers or encoder_moe_layers else m["expert_d_ff"]),
      matmul=m["matmul"], num_shared_experts=shared,
      expert_depth=m["expert_depth"])
  return TransformerConfig(
      vocab_size=data.vocab_size, max_len=max(data.seq_len, data.target_len or 0),
      num_layers=m["num_layers"],
      d_model=m["d_model"], num_heads=m["num_heads"], d_ff=m["d_ff"],
      moe_layers=moe_layers, moe=moe, dtype=m["dtype"], ffn_init=m["ffn_init"],
      scan_layers=m["scan_layers"], remat=m["remat"], arch=m["arch"],
      num_encoder_layers=m["num_encoder_layers"],
      encoder_moe_layers=encoder_moe_layers,
      share_embeddings=m["share_embeddings"])


def _encoder_placement(m: dict[str, Any]) -> tuple[int, ...]:
  """`model.encoder_moe_layers` resolved (() unless `arch=encdec`); checks the
  other encoder-stack keys."""
  depth = m["num_encoder_layers"]
  if depth is not None:
    _positive("model", m, ("num_encoder_layers",))
  if not isinstance(m["share_embeddings"], bool):
    raise ConfigError(f"model.share_embeddings must be True or False, got "
                      f"{m['share_embeddings']!r}")
  if m["arch"] != "encdec":
    return ()
  spec = m["encoder_moe_layers"]
  return resolve_moe_layers(m["moe_layers"] if spec == SAME_PLACEMENT else spec,
                            depth or m["num_layers"],
                            key="model.encoder_moe_layers")


def _stage_lengths(entries: list[dict], total: int) -> list[int]:
  lengths, open_slots = [], []
  for i, e in enumerate(entries):
    if e["steps"] and e["fraction"]:
      raise ConfigError(f"stages[{i}] ({e['name']}) sets both steps and fraction; "
                        "keep one")
    if e["steps"] < 0 or not 0 <= e["fraction"] <= 1:
      raise ConfigError(f"stages[{i}] ({e['name']}) has a negative length")
    length = e["steps"] or round(e["fraction"] * total)
    if not (e["steps"] or e["fraction"]):
      open_slots.append(i)
    lengths.append(length)
  if len(open_slots) > 1:
    raise ConfigError("only one stage may leave steps and fraction unset (it "
                      "takes the remaining steps)")
  if open_slots:
    lengths[open_slots[0]] = total - sum(lengths)
  if sum(lengths) != total or any(n <= 0 for n in lengths):
    raise ConfigError(f"stages cover {lengths} steps but train.steps={total}; "
                      "make every stage positive and the total match")
  return lengths


def _stages(c: dict[str, Any], data: DataConfig) -> tuple[Stage, ...]:
  entries = c["stages"]
  if not entries:
    return (Stage(name="train", steps=c["train"]["steps"],
                  model=_model(c["model"], data)),)
  lengths = _stage_lengths(entries, c["train"]["steps"])
  stages = []
  for i, (e, length) in enumerate(zip(entries, lengths)):
    overrides = dict(e["model"])
    unknown = set(overrides) - set(c["model"])
    if unknown:
      raise ConfigError(f"stages[{i}].model has unknown keys {sorted(unknown)}; "
                        f"valid: {', '.join(sorted(c['model']))}")
    merged = copy.deepcopy(c["model"])
    if "router" in overrides and overrides["router"] != merged["router"]:
      merged["router_options"] = {}  # Options belong to the base router.
    options = {**merged["router_options"], **overrides.pop("router_options", {})}
    merged.update(overrides, router_options=options)
    frozen = tuple(e["frozen"])
    if e["transform"]:
      transition, options = get_transition(e["transform"],
                                           dict(e["transform_options"]))
      frozen += transition.frozen
    else:
      options = {}
    for pattern in frozen:
      try:
        re.compile(pattern)
      except re.error as err:
        raise ConfigError(f"stages[{i}].frozen rule {pattern!r} is not a valid "
                          f"regex ({err})") from None
    model = _model(merged, data)
    if e["transform"]:
      transition.check(model)
    stages.append(Stage(
        name=e["name"], steps=length, model=model, frozen=frozen,
        transform=e["transform"], transform_options=tuple(sorted(options.items()))))
  if stages[0].transform and not c["train"]["init_from"]:
    raise ConfigError(f"stages[0] applies {stages[0].transform!r} on entry but "
                      "nothing precedes it; set train.init_from to a finished run "
                      "or add a stage before it")
  names = [st.name for st in stages]
  if len(set(names)) != len(names):
    raise ConfigError(f"stage names must differ, got {names}")
  return tuple(stages)


def check_micro_batch(train: TrainConfig, shards: int) -> None:
  """ConfigError unless each micro-batch splits over the `shards` devices that
  split the batch."""
  micro = train.batch_size // train.grad_accum_steps
  # k = 1: the batch's own check (`shard_batch`) words the error.
  if train.grad_accum_steps > 1 and micro % shards:
    raise ConfigError(
        f"train.batch_size={train.batch_size} / train.grad_accum_steps="
        f"{train.grad_accum_steps} = {micro} sequences per micro-batch, not a "
        f"multiple of the {shards} devices splitting the batch (mesh.data x "
        "mesh.expert)")


def parse(config: ml_collections.ConfigDict) -> RunConfig:
  """Validates `config` and returns its typed form; ConfigError names the key."""
  c = config.to_dict()
  for section in ("model", "data", "train", "optim", "mesh"):
    if section not in c:
      raise ConfigError(f"config has no {section!r} section; start from "
                        "moejax.train.config.default_config()")
  _positive("train", c["train"], ("steps", "batch_size", "log_every",
                                  "eval_every", "checkpoint_every",
                                  "keep_checkpoints", "grad_accum_steps"))
  if c["train"]["batch_size"] % c["train"]["grad_accum_steps"]:
    raise ConfigError(
        f"train.batch_size={c['train']['batch_size']} does not split into "
        f"train.grad_accum_steps={c['train']['grad_accum_steps']} micro-batches;"
        " make the batch size a multiple of it")
  smoothing = c["train"]["label_smoothing"]
  if not (isinstance(smoothing, (int, float)) and not isinstance(smoothing, bool)
          and 0 <= smoothing < 1):
    raise ConfigError(f"train.label_smoothing must be in [0, 1), got "
                      f"{smoothing!r}")
  if c["train"]["probe_every"] < 0:
    raise ConfigError("train.probe_every must be >= 0 (0: no probes), got "
                      f"{c['train']['probe_every']}")
  replay = c["train"]["replay_routes"]
  if replay not in ("", "first") and not os.path.isfile(replay):
    raise ConfigError(f"train.replay_routes={replay!r} is not a file; give a "
                      "probes/trace_<step>.npz of a run, 'first' or ''")
  _positive("data", c["data"], ("seq_len", "vocab_size", "eval_batches"))
  o = c["optim"]
  _choice("optim.schedule", o["schedule"], SCHEDULES)
  if not (isinstance(o["learning_rate"], (int, float))
          and math.isfinite(o["learning_rate"]) and o["learning_rate"] > 0):
    raise ConfigError(f"optim.learning_rate must be > 0, got {o['learning_rate']!r}")
  if o["warmup_steps"] < 0:
    raise ConfigError(f"optim.warmup_steps must be >= 0, got {o['warmup_steps']}")
  try:
    data = DataConfig(**c["data"])
    train = TrainConfig(**c["train"])
    optim = OptimizerConfig(**c["optim"])
  except TypeError as e:
    raise ConfigError(f"unknown config key: {e}") from None
  stages = _stages(c, data)
  mesh = MeshConfig(**c["mesh"])
  mesh.validate()
  if -1 not in (mesh.data, mesh.expert):  # Else checked with the devices.
    check_micro_batch(train, mesh.data * mesh.expert)
  return RunConfig(model=stages[-1].model, data=data, train=train, optim=optim,
                   stages=stages, mesh=mesh)
