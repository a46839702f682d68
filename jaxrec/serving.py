"""Serving a trained run: batched top-k in raw item ids, and its export.

`Predictor(run_dir)` restores a checkpoint's params and vocabulary and
answers `topk(histories, k)` for histories of raw item ids: unknown raw ids
are dropped (and counted), the known ones are left-padded to the model's
`max_len` (the most recent kept), and the model's top k items come back as
raw ids with their scores (the head's: softmax logits, or the tree
softmax's log-probabilities). A history with no known id cannot be scored
by the model; it gets the popularity ranking instead, marked as such.

A fine-tuning (`jaxrec finetune`: `train.task` cold_start or profile) is
served the same way in its own terms: a history is raw *source* ids,
encoded as it trained (`jaxrec.data.transfer`: unknown ids read as the UNK
token and are counted, never dropped; then CLS), scored by its user
representation and head, and answered in the names of its outputs
(target items or labels, DIR/outputs.json), not catalogue items; so
`exclude_seen` is refused, and every history is scored.

`exclude_seen` excludes every known item of the whole history, not only
the model's window (the seen ids are an input of their own, `seen_ids`).
A head with its own exact search (`Head.topk`: the tree softmax's early
exit, which decides on the host) answers `topk` without `exclude_seen`;
the export, one traced program, always scans every item tile by tile.

`export_topk(run_dir, path)` writes the same scoring function as a
`jax.export` serialization, with the params baked in as constants and a
symbolic batch dimension, next to the vocabulary, in one zip file: a
serving process needs jax and the file, not jaxrec (`load_exported`, and
the few-line loader in the README, read it back). A fine-tuning's zip
adds its outputs' names and says so in its spec.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec import heads, tasks
from jaxrec.config import Config
from jaxrec.data import transfer as transfer_data
from jaxrec.data import vocabulary as vocab_lib
from jaxrec.errors import JaxrecError, reported_as
from jaxrec.training.state import load_params

EXPORT_FORMAT = "jaxrec.export/1"
# A fine-tuning's export: its ids are the head's outputs, not items, so a
# reader of next-item exports must not take it for one.
FINETUNING_EXPORT_FORMAT = "jaxrec.export-finetuning/1"
# Members of an exported zip (see `export_topk`).
EXPORTED_FN = "topk.jaxexport"
EXPORTED_VOCAB = vocab_lib.FILENAME
EXPORTED_SPEC = "serving.json"
EXPORTED_OUTPUTS = transfer_data.OUTPUTS_FILE  # Fine-tunings only.
_MAX_BATCH = 256  # Histories per compiled call of `Predictor.topk`.


def head_outputs(cfg: Config) -> int:
  """V, the ids the head scores (0 included, never returned): the
  catalogue's items for a next-item model, the task's outputs for a
  fine-tuning (`head.num_classes`)."""
  return cfg.head.num_outputs(cfg.model)


def is_finetuning(cfg: Config) -> bool:
  """Whether `cfg` is a fine-tuning (its outputs are not the items)."""
  return cfg.train.task != "auto"


def topk_fn(cfg: Config, k: int, exclude_seen: bool = False
            ) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """(params, inputs [B, T] int32) -> (ids [B, k] int32, scores [B, k]
  float32), best first, over every real output (`head_outputs`: items,
  or a fine-tuning's outputs), tile by tile (never a [B, V] matrix).
  Padding and ids >= V score -inf; a row with fewer than k such items has
  -inf entries at its end. B may be symbolic (jax.export).

  With `exclude_seen` the function takes a third argument, `seen` [B, S]
  int32: the model ids of each row's whole history (0 pads), which score
  -inf too. It is its own input because a history is longer than the
  model's window: excluding only `inputs` recommended items the user had
  seen before their last `max_len`."""
  head = heads.get(cfg.head.name)
  # A masked (bidirectional) model reads the next item off a trailing MASK;
  # a fine-tuning reads its user representation (`tasks.transfer`).
  represent = tasks.for_config(cfg).represent
  v = head_outputs(cfg)
  tile = min(cfg.train.loss_chunk, v)
  num_tiles = -(-v // tile)

  def seen_in_tile(history, start):
    # One row's seen ids as a [tile] mask; out-of-tile ids go to index
    # `tile` and are dropped (a negative index would wrap around).
    local = history - start
    local = jnp.where((local >= 0) & (local < tile), local, tile)
    return jnp.zeros(tile, bool).at[local].set(True, mode="drop")

  def search(params, inputs, seen):
    ctx = head.prepare(params, cfg, represent(params, cfg, inputs))

    def step(carry, start):
      best_scores, best_ids = carry
      scores = head.tile_scores(params, cfg, ctx, start, tile)
      ids = start + jnp.arange(tile, dtype=jnp.int32)
      out = (ids == 0) | (ids >= v)
      if seen is not None:
        out = out[None, :] | jax.vmap(seen_in_tile, (0, None))(seen, start)
      scores = jnp.where(out, -jnp.inf, scores.astype(jnp.float32))
      all_scores = jnp.concatenate([best_scores, scores], axis=1)
      all_ids = jnp.concatenate(
          [best_ids, jnp.broadcast_to(ids, scores.shape)], axis=1)
      top, pos = jax.lax.top_k(all_scores, k)
      return (top, jnp.take_along_axis(all_ids, pos, axis=1)), None

    b = inputs.shape[0]
    init = (jnp.full((b, k), -jnp.inf, jnp.float32),
            jnp.zeros((b, k), jnp.int32))
    starts = jnp.arange(num_tiles, dtype=jnp.int32) * tile
    (scores, ids), _ = jax.lax.scan(step, init, starts)
    return ids, scores

  if exclude_seen:
    return search
  return lambda params, inputs: search(params, inputs, None)


def check_k(k: int, num_items: int, option: str = "--topk") -> int:
  """k within 1..V-1 (the real items, or outputs)."""
  check_k_option(k, option)
  return min(k, num_items - 1)


def check_k_option(k: Any, option: str = "--topk") -> None:
  """k a positive integer (checked before a checkpoint is read)."""
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise JaxrecError(f"{option}={k}: expected an integer >= 1")


def encode_histories(vocab: vocab_lib.Vocabulary,
                     histories: Sequence[Sequence[str]], max_len: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(inputs [N, max_len] left-padded, unknown tokens per row, known
  tokens per row): unknown raw ids dropped, the last max_len known kept."""
  inputs = np.zeros((len(histories), max_len), np.int32)
  unknown = np.zeros(len(histories), np.int64)
  known = np.zeros(len(histories), np.int64)
  for row, history in enumerate(histories):
    ids, unknown[row] = vocab.encode_items(list(history))
    ids = ids[ids > 0][-max_len:]
    known[row] = int(np.sum(ids > 0))
    if len(ids):
      inputs[row, max_len - len(ids):] = ids
  return inputs, unknown, known


def seen_ids(vocab: vocab_lib.Vocabulary,
             histories: Sequence[Sequence[str]], min_len: int = 1
             ) -> np.ndarray:
  """[N, S] int32: the known model ids of each whole history (not only
  the model's window), 0-padded; S a power of two >= min_len, so a few
  shapes cover every request (each new S compiles once)."""
  rows = [np.unique(vocab.encode_items(list(h))[0]) for h in histories]
  rows = [r[r > 0] for r in rows]
  longest = max([min_len, *map(len, rows)])
  out = np.zeros((len(rows), 1 << (longest - 1).bit_length()), np.int32)
  for row, ids in enumerate(rows):
    out[row, :len(ids)] = ids
  return out


def encode_sources(vocab: vocab_lib.Vocabulary,
                   histories: Sequence[Sequence[str]], cfg: Config
                   ) -> tuple[np.ndarray, np.ndarray]:
  """A fine-tuning's (inputs [N, max_len], unknown ids per row), encoded
  as it trained: raw source ids through the pretraining vocabulary,
  unknown ones as the UNK token (counted, not dropped), then
  `transfer.model_inputs` (source then CLS, or CLS, source, CLS)."""
  ids, unknown = transfer_data.encode_sources(
      [list(h) for h in histories], vocab, cfg.model.token_id("unk"))
  inputs = transfer_data.model_inputs(ids, cfg.data.max_len,
                                      cfg.model.is_causal(),
                                      cfg.model.token_id("cls"))
  return inputs, unknown


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One history's top-k: raw item ids (a fine-tuning's: its outputs'
  names), best first, and their scores (None for a popularity fallback,
  which has ranks but no model score)."""
  items: list[str]
  scores: list[float] | None
  # Raw ids of the history the vocabulary does not know (dropped; in a
  # fine-tuning, read as the UNK token).
  unknown: int
  fallback: str | None  # "popularity" when no id of the history was known.


def head_topk_fn(cfg: Config, k: int) -> Callable:
  """`topk_fn`'s answer through the head's own `topk` (called outside jit:
  it may decide on the host). Padding is dropped by asking for k + 1."""
  head = heads.get(cfg.head.name)
  represent = jax.jit(tasks.for_config(cfg).represent, static_argnums=1)

  @jax.jit
  def without_padding(scores, ids):
    scores = jnp.where(ids == 0, -jnp.inf, scores.astype(jnp.float32))
    top, pos = jax.lax.top_k(scores, k)  # Ties keep the head's order.
    return jnp.take_along_axis(ids, pos, axis=1).astype(jnp.int32), top

  def topk(params, inputs):
    scores, ids = head.topk(params, cfg, represent(params, cfg, inputs),
                            k + 1)
    return without_padding(scores, ids)

  return topk


class Predictor:
  """Top-k recommendations of a run's checkpoint, in raw item ids (a
  fine-tuning's: in its outputs' names)."""

  def __init__(self, run_dir: str, kind: str | None = None):
    self.run_dir = run_dir
    self.params, self.cfg, self.meta = load_params(run_dir, kind)
    self.vocab = vocab_lib.of_run(run_dir)
    self.vocab.check_matches(self.meta.get("vocabulary"), run_dir)
    if self.vocab.num_items != self.cfg.model.num_items:
      raise JaxrecError(f"{run_dir}: vocabulary.json has "
                        f"{self.vocab.num_items} item ids, the model "
                        f"{self.cfg.model.num_items}")
    # What the returned ids name: the catalogue's items, or the outputs.
    self.outputs: transfer_data.Outputs | None = None
    self.names = self.vocab.items
    if is_finetuning(self.cfg):
      self.outputs = transfer_data.Outputs.load(run_dir)
      self.outputs.check_matches(self.meta, head_outputs(self.cfg),
                                 self.cfg.train.task, run_dir)
      self.names = np.array(self.outputs.names, dtype=str)
    self.max_len = self.cfg.data.max_len
    self._fns: dict[tuple[int, bool], Callable] = {}

  @property
  def finetuning(self) -> bool:
    return self.outputs is not None

  def check_request(self, k: int, exclude_seen: bool) -> int:
    """The one validation of what predict and export are asked for: k
    (returned within 1..outputs-1) and `exclude_seen`, which a
    fine-tuning refuses: its outputs are another vocabulary than its
    inputs, there is nothing seen to exclude."""
    if exclude_seen and self.finetuning:
      raise JaxrecError(f"--exclude-seen: {self.run_dir} is a fine-tuning "
                        f"({self.cfg.train.task}) whose outputs are not the "
                        "items of its histories; drop --exclude-seen")
    return check_k(k, len(self.names))

  def _fn(self, k: int, exclude_seen: bool) -> Callable:
    """(params, inputs) -> (ids, scores): the head's own search where it
    has one (the tree softmax's exact early exit), else the tile scan."""
    key = (k, exclude_seen)
    if key not in self._fns:
      head = heads.get(self.cfg.head.name)
      if head.topk is not None and not exclude_seen:
        self._fns[key] = head_topk_fn(self.cfg, k)
      else:
        self._fns[key] = jax.jit(topk_fn(self.cfg, k, exclude_seen))
    return self._fns[key]

  def encode(self, histories: Sequence[Sequence[str]]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs [N, max_len], unknown ids per row, whether the model can
    score each row): next-item histories lose their unknown ids and need
    a known one; a fine-tuning's keep them as UNK and are all scored."""
    if self.finetuning:
      inputs, unknown = encode_sources(self.vocab, histories, self.cfg)
      return inputs, unknown, np.ones(len(histories), bool)
    inputs, unknown, known = encode_histories(self.vocab, histories,
                                              self.max_len)
    return inputs, unknown, known > 0

  def topk(self, histories: Sequence[Sequence[str]], k: int,
           exclude_seen: bool = False) -> list[Prediction]:
    """The top k of each history (oldest item first), batched."""
    k = self.check_request(k, exclude_seen)
    inputs, unknown, scorable = self.encode(histories)
    fn = self._fn(k, exclude_seen)
    scored = np.flatnonzero(scorable)
    # The whole history's ids, not the window's (`topk_fn`).
    seen = (seen_ids(self.vocab, [histories[r] for r in scored],
                     self.max_len) if exclude_seen else None)
    ids = np.zeros((len(histories), k), np.int32)
    scores = np.full((len(histories), k), -np.inf, np.float32)
    # Padded to a power of two up to _MAX_BATCH: a handful of compiles
    # whatever the number of histories.
    size = min(_MAX_BATCH, 1 << max(0, int(len(scored) - 1).bit_length()))
    for begin in range(0, len(scored), size):
      rows = scored[begin:begin + size]
      batch = np.zeros((size, self.max_len), np.int32)
      batch[:len(rows)] = inputs[rows]
      if seen is None:
        top_ids, top_scores = fn(self.params, batch)
      else:
        seen_batch = np.zeros((size, seen.shape[1]), np.int32)
        seen_batch[:len(rows)] = seen[begin:begin + size]
        top_ids, top_scores = fn(self.params, batch, seen_batch)
      ids[rows] = np.asarray(top_ids)[:len(rows)]
      scores[rows] = np.asarray(top_scores)[:len(rows)]
    popular = self.vocab.items[1:k + 1].tolist()
    out = []
    for row in range(len(histories)):
      if not scorable[row]:
        out.append(Prediction(popular, None, int(unknown[row]),
                              "popularity"))
        continue
      keep = np.isfinite(scores[row])  # Fewer than k unseen items left.
      out.append(Prediction(
          self.names[ids[row][keep]].tolist(),
          [float(s) for s in scores[row][keep]], int(unknown[row]), None))
    return out


# ------------------------------------------------------------------ export


# What `jax.export` lowers for (it accepts any other name without a word
# and writes an export no machine can run).
EXPORT_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def check_export_options(path: str, k: int,
                         platforms: Sequence[str] | None) -> None:
  """Every export option checked before a checkpoint is read or a byte
  written: k, the platforms, and a path whose folder exists and that is
  not a folder itself."""
  check_k_option(k)
  if platforms is not None:
    unknown = [p for p in platforms if p not in EXPORT_PLATFORMS]
    if unknown or not platforms:
      raise JaxrecError(f"--platforms={','.join(platforms)}: expected some "
                        f"of {','.join(EXPORT_PLATFORMS)}")
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise JaxrecError(f"--out={path}: is a folder; name the zip to write")
  if not os.path.isdir(folder):
    raise JaxrecError(f"--out={path}: folder {folder} does not exist")
  if not os.access(folder, os.W_OK):
    raise JaxrecError(f"--out={path}: folder {folder} is not writable")


def export_topk(run_dir: str, path: str, k: int = 10,
                exclude_seen: bool = False, kind: str | None = None,
                platforms: Sequence[str] | None = None) -> dict[str, Any]:
  """Writes `path` (a zip): the top-k function as a `jax.export`
  serialization (params baked in, batch dimension symbolic, inputs
  int32 [B, max_len] left-padded model ids; with `exclude_seen` a second
  input, the whole history's ids [B, S], S symbolic too), the vocabulary
  and a `serving.json` spec. Returns the spec.

  A fine-tuning's zip (format FINETUNING_EXPORT_FORMAT) also holds
  `outputs.json` (its outputs' names by id, as in its run directory), and
  its spec names the task and the input tokens (CLS, UNK) and layout its
  inputs are encoded with; a next-item zip is as it always was.

  The zip appears whole or not at all: it is written beside `path` under
  a temporary name and renamed, and the temporary file is removed on any
  failure."""
  check_export_options(path, k, platforms)
  predictor = Predictor(run_dir, kind)
  k = predictor.check_request(k, exclude_seen)
  params, cfg = predictor.params, predictor.cfg
  fn = topk_fn(cfg, k, exclude_seen)
  if exclude_seen:
    batch, seen_len = jax.export.symbolic_shape("batch, seen_len")
    args = (jax.ShapeDtypeStruct((batch, predictor.max_len), jnp.int32),
            jax.ShapeDtypeStruct((batch, seen_len), jnp.int32))
  else:
    batch = jax.export.symbolic_shape("batch")[0]
    args = (jax.ShapeDtypeStruct((batch, predictor.max_len), jnp.int32),)
  with reported_as(run_dir, "export the scoring function"):
    exported = jax.export.export(
        jax.jit(lambda *inputs: fn(params, *inputs)),
        platforms=tuple(platforms) if platforms else None)(*args)
    blob = exported.serialize()
  spec = {"format": EXPORT_FORMAT, "k": k, "exclude_seen": exclude_seen,
          "max_len": predictor.max_len,
          "num_items": predictor.vocab.num_items,
          "platforms": list(exported.platforms),
          "vocabulary": predictor.vocab.fingerprint(),
          "checkpoint": {"dir": os.path.abspath(run_dir),
                         "step": predictor.meta["step"]},
          "inputs": "int32 [batch, max_len]: model ids, left-padded with 0",
          "outputs": "(int32 [batch, k] ids, float32 [batch, k] scores), "
                     "best first; -inf marks no item"}
  if exclude_seen:
    spec["inputs"] += ("; then int32 [batch, seen_len], any seen_len: the "
                       "model ids of the whole history (0 pads), never "
                       "returned")
  outputs = predictor.outputs
  if outputs is not None:
    causal = cfg.model.is_causal()
    layout = ("source ids then cls_id" if causal else
              "cls_id, source ids, cls_id")
    room = transfer_data.source_room(predictor.max_len, causal)
    spec.update({
        "format": FINETUNING_EXPORT_FORMAT, "task": cfg.train.task,
        "num_outputs": len(outputs.names),
        "outputs_fingerprint": outputs.fingerprint(),
        "causal": causal,
        "cls_id": cfg.model.token_id("cls"),
        "unk_id": cfg.model.token_id("unk"),
        "inputs": "int32 [batch, max_len]: a user's source-domain history "
                  "as vocabulary.json's model ids (unknown raw ids: unk_id), "
                  f"its last {room} kept, as {layout}, left-padded with 0",
        "outputs": f"(int32 [batch, k] output ids: {cfg.train.task} "
                   f"outputs named by {EXPORTED_OUTPUTS}, not catalogue "
                   "items; float32 [batch, k] scores), best first; -inf "
                   "marks no output"})
  members = {EXPORTED_FN: bytes(blob),
             EXPORTED_VOCAB: json.dumps(
                 {"format": vocab_lib.FORMAT,
                  "fingerprint": predictor.vocab.fingerprint(),
                  "items": predictor.vocab.items.tolist(),
                  "users": predictor.vocab.users.tolist()}),
             EXPORTED_SPEC: json.dumps(spec, indent=2)}
  if outputs is not None:
    members[EXPORTED_OUTPUTS] = json.dumps(outputs.to_json())
  write_zip_atomically(path, members)
  return spec


def write_zip_atomically(path: str, members: dict[str, str | bytes]) -> None:
  """`path` holds exactly `members`, or is as it was: a failure (disk
  full, Ctrl-C) leaves neither a partial zip nor the temporary file."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with reported_as(path, "write the export"):
      with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
          z.writestr(name, data)
      os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load_exported(path: str) -> tuple[Any, vocab_lib.Vocabulary,
                                      dict[str, Any]]:
  """(jax.export.Exported, Vocabulary, spec) of an `export_topk` file.
  The vocabulary encodes the inputs (and, next-item, decodes the ids); a
  fine-tuning's spec comes back with `output_names` (its outputs.json's
  names by output id), which decode its ids."""
  with reported_as(path, "read the export"):
    with zipfile.ZipFile(path) as z:
      exported = jax.export.deserialize(bytearray(z.read(EXPORTED_FN)))
      spec = json.loads(z.read(EXPORTED_SPEC))
      raw = json.loads(z.read(EXPORTED_VOCAB))
      finetuning = spec.get("format") == FINETUNING_EXPORT_FORMAT
      outputs = (json.loads(z.read(EXPORTED_OUTPUTS)) if finetuning
                 else None)
  if spec.get("format") not in (EXPORT_FORMAT, FINETUNING_EXPORT_FORMAT):
    raise JaxrecError(f"{path}: export format {spec.get('format')!r}; "
                      f"expected {EXPORT_FORMAT!r} or "
                      f"{FINETUNING_EXPORT_FORMAT!r}")
  vocab = vocab_lib.Vocabulary(np.array(raw["items"], dtype=str),
                               np.array(raw["users"], dtype=str))
  if finetuning:
    names = transfer_data.Outputs.from_json(
        outputs, f"{path}:{EXPORTED_OUTPUTS}").names
    if len(names) != spec.get("num_outputs"):
      raise JaxrecError(f"{path}: {EXPORTED_OUTPUTS} names {len(names)} "
                        f"outputs, serving.json {spec.get('num_outputs')}")
    spec = {**spec, "output_names": list(names)}
  return exported, vocab, spec
