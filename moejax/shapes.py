"""The shape letters of moejax: each uppercase letter names one kind of axis.

A name's suffix spells its array's axes (`x_TD`: T tokens by D model width), and
every module's docstring lists the letters it uses on a `Shapes:` line, each
with the meaning below (a module may add what it is there: "T tokens of one
device"). Einsum strings use the same letters in lowercase. STYLE's eight come
first; the rest follow alphabetically.

  B  batch: rows (sequences) of a batch
  L  length: positions of a sequence (of one call when decoding)
  T  tokens: B * L flattened (inside a shard_map body, one device's)
  D  model width
  F  hidden width: of an expert FFN, or of a router's own hidden layer
  E  experts: the routed experts
  C  capacity: rows of one expert's buffer
  K  top-k: routing slots per token (E for routers that score every expert)
  A  head width: the width of one attention head
  G  groups: of a grouped matmul, one per expert it runs (all E, or a device's)
  H  heads: attention heads
  I  input width: the contracted width of a matmul kernel (D or F)
  J  codes: a DSelect-k selector's binary codes (2^U)
  M  routed rows: kept slots sorted by expert, at most T * K
  N  devices: of the `expert` mesh axis, or all those splitting the tokens
  O  output width: a matmul kernel's output width (F or D)
  P  row tiles: a matmul kernel's tiles of rows
  Q  expert groups: of group-limited routing
  R  buffer rows: rows allocated, padded or received for a buffer
  S  slots: the T * K routing slots of [T, K], flattened
  U  code bits: of a DSelect-k selector's codes
  V  vocabulary
  W  selectors: DSelect-k's top_k selectors
  X  cache positions: the positions a KV cache holds (max_len)
  Y  steps: of a sequential loop (decoding, probes, a schedule)
  Z  shared experts: experts every token uses

Lowercase letters and multi-letter words in names are not shapes (`tm`,
`num_k`). `GLOSSARY` maps each letter to the words its `Shapes:` entries start
with; tests/test_shapes.py holds every module to it.
"""

GLOSSARY: dict[str, str] = {
    "B": "batch",
    "L": "length",
    "T": "tokens",
    "D": "model width",
    "F": "hidden width",
    "E": "experts",
    "C": "capacity",
    "K": "top-k",
    "A": "head width",
    "G": "groups",
    "H": "heads",
    "I": "input width",
    "J": "codes",
    "M": "routed rows",
    "N": "devices",
    "O": "output width",
    "P": "row tiles",
    "Q": "expert groups",
    "R": "buffer rows",
    "S": "slots",
    "U": "code bits",
    "V": "vocabulary",
    "W": "selectors",
    "X": "cache positions",
    "Y": "steps",
    "Z": "shared experts",
}
