"""Data of PeterRec's downstream tasks: a user's source-domain sequence, and
what to predict from it.

Line formats (one user per line, UTF-8; ids are raw ids as in the
pretraining data):

  cold start   s1,s2,...,sn,,t1,t2,...,tm    source items, then the user's
                                             target-domain items
  profile      s1,s2,...,sn,,label           source items, then one label

Processing (`load`):
- source ids go through the pretraining run's vocabulary
  (`jaxrec.data.vocabulary`); an id it has never seen becomes the UNK token
  (`model.special_tokens`), counted and reported in `meta`;
- users (lines) are split into train / valid / test first
  (`data.valid_fraction`, `data.test_fraction`, `data.split_seed`), and only
  then are a cold-start user's targets expanded into one example each, so a
  user never lands in two splits (the official code shuffles expanded
  examples, so it does);
- target items get ids 1..V_t-1 by their frequency among the training
  users' targets (items only valid or test users have come last), classes
  ids 1..K in sorted label order; 0 is never a target;
- the model input is the last `max_len - 1` source ids then CLS (a causal
  backbone reads the user at the last position), or CLS, the last
  `max_len - 2`, CLS (a bidirectional one reads both ends).

The result is a `TransferData` (a `SequenceData`) whose `num_items` is
the *model's* input vocabulary, `train` rows are the input then the target,
`item_counts` count the training targets over the head's outputs (the
popularity baseline), `vocab` is the model's (the pretraining run's) input
vocabulary, and `outputs` names the head's outputs (`Outputs`: the training
loop keeps them as DIR/outputs.json, so serving needs no downstream file).
`synthetic_world` writes a two-domain world in these formats.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np

from jaxrec.config import DataConfig
from jaxrec.data import synthetic
from jaxrec.data.sequences import SequenceData
from jaxrec.data.vocabulary import Vocabulary
from jaxrec.errors import JaxrecError, reported_as

TASKS = ("cold_start", "profile")
FORMAT_VERSION = 1  # Bump when the same file would give other arrays.
OUTPUTS_FILE = "outputs.json"
OUTPUTS_FORMAT = "jaxrec.outputs/1"


@dataclasses.dataclass(frozen=True)
class Outputs:
  """What a fine-tuning's head outputs are: `names[i]` is the raw target
  item (cold_start) or label (profile) of output id i; `names[0]` is ""
  (never a target, never scored). A run keeps them as DIR/outputs.json
  (written atomically):

    {"format": "jaxrec.outputs/1", "task": TASK, "fingerprint": SHA256,
     "data_fingerprint": ..., "names": ["", NAME_1, ...]}

  `fingerprint` hashes task and names (a damaged file is refused);
  `data_fingerprint` is the data's, which every checkpoint records, so a
  file that belongs to another fine-tuning is refused too
  (`check_matches`)."""
  task: str
  names: tuple[str, ...]
  data_fingerprint: str

  def fingerprint(self) -> str:
    blob = json.dumps({"task": self.task, "names": list(self.names)})
    return hashlib.sha256(blob.encode()).hexdigest()

  def to_json(self) -> dict[str, Any]:
    return {"format": OUTPUTS_FORMAT, "task": self.task,
            "fingerprint": self.fingerprint(),
            "data_fingerprint": self.data_fingerprint,
            "names": list(self.names)}

  def save(self, directory: str) -> str:
    """Writes DIRECTORY/outputs.json atomically; returns its path."""
    path = os.path.join(directory, OUTPUTS_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    with reported_as(path, "write the fine-tuning's outputs"):
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(self.to_json(), f)
        f.write("\n")
      os.replace(tmp, path)
    return path

  @staticmethod
  def from_json(raw: Any, origin: str) -> "Outputs":
    """Parses `to_json`'s dict, checking format and fingerprint."""
    if not isinstance(raw, dict) or raw.get("format") != OUTPUTS_FORMAT:
      found = raw.get("format") if isinstance(raw, dict) else None
      raise JaxrecError(f"{origin}: outputs format {found!r}; expected "
                        f"{OUTPUTS_FORMAT!r}")
    names = raw.get("names")
    if not (isinstance(names, list) and names and names[0] == ""
            and all(isinstance(n, str) for n in names)):
      raise JaxrecError(f"{origin}: 'names' must be a list of strings "
                        "starting with '' (output 0)")
    out = Outputs(str(raw.get("task")), tuple(names),
                  str(raw.get("data_fingerprint")))
    if out.fingerprint() != raw.get("fingerprint"):
      raise JaxrecError(f"{origin}: damaged (its contents do not match its "
                        "fingerprint)")
    return out

  @staticmethod
  def load(run_dir: str) -> "Outputs":
    """RUN_DIR/outputs.json; a fine-tuning made before jaxrec recorded its
    outputs has none, which is one line naming the file."""
    path = os.path.join(run_dir, OUTPUTS_FILE)
    if not os.path.isfile(path):
      raise JaxrecError(f"{run_dir}: a fine-tuning without {OUTPUTS_FILE} "
                        "(made before jaxrec recorded its head's outputs); "
                        "fine-tune it again to serve it")
    with reported_as(path, "read the fine-tuning's outputs"):
      with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    return Outputs.from_json(raw, path)

  def check_matches(self, meta: dict[str, Any], num_outputs: int, task: str,
                    origin: str) -> None:
    """Refuses outputs other than those the checkpoint (its `meta`, its
    head's `num_outputs` rows, its `task`) was trained on."""
    if self.data_fingerprint != meta.get("data_fingerprint"):
      raise JaxrecError(f"{origin}: its {OUTPUTS_FILE} is not the one its "
                        "checkpoint was trained with (data fingerprint "
                        "differs)")
    if len(self.names) != num_outputs or self.task != task:
      raise JaxrecError(f"{origin}: its {OUTPUTS_FILE} names "
                        f"{len(self.names) - 1} {self.task} outputs; the "
                        f"checkpoint's head has {num_outputs - 1} "
                        f"({task})")


@dataclasses.dataclass(frozen=True)
class TransferData(SequenceData):
  """Downstream data: a `SequenceData` that also names its outputs."""
  outputs: Outputs | None = None


@dataclasses.dataclass(frozen=True)
class UserLines:
  """Parsed lines: raw source ids and raw targets (labels) per user."""
  sources: list[list[str]]
  targets: list[list[str]]


def read_lines(path: str, task: str) -> UserLines:
  """Parses a cold-start or profile file; errors name the file and line."""
  if task not in TASKS:
    raise JaxrecError(f"--task={task!r}: expected one of {list(TASKS)}")
  if not os.path.isfile(path):
    raise JaxrecError(f"{path}: file not found")
  sources, targets = [], []
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8").strip()
      except UnicodeDecodeError:
        raise JaxrecError(f"{path}:{lineno}: not UTF-8 text") from None
      if not line:
        continue
      source, sep, target = line.partition(",,")
      where = f"{path}:{lineno}"
      if not sep:
        raise JaxrecError(f"{where}: expected 'source ids,,{_what(task)}' "
                          "(two commas between the parts)")
      src = _ids(source, where, "source ids")
      tgt = _ids(target, where, _what(task))
      if task == "profile" and len(tgt) != 1:
        raise JaxrecError(f"{where}: expected one label after ',,', got "
                          f"{len(tgt)}")
      sources.append(src)
      targets.append(tgt)
  if not sources:
    raise JaxrecError(f"{path}: no users (the file has no lines)")
  return UserLines(sources, targets)


def _what(task: str) -> str:
  return "target items" if task == "cold_start" else "label"


def _ids(text: str, where: str, what: str) -> list[str]:
  ids = [t.strip() for t in text.split(",")]
  if not text.strip() or any(not t for t in ids):
    raise JaxrecError(f"{where}: empty {what} (ids are separated by one "
                      "comma)")
  return ids


def split_users(num_users: int, cfg: DataConfig) -> dict[str, np.ndarray]:
  """User indices of each split: a seeded shuffle, then test, valid, train."""
  order = np.random.default_rng(cfg.split_seed).permutation(num_users)
  n_test = int(round(cfg.test_fraction * num_users))
  n_valid = int(round(cfg.valid_fraction * num_users))
  if num_users - n_test - n_valid < 1 or n_test < 1 or n_valid < 1:
    raise JaxrecError(f"data: {num_users} users cannot be split into train, "
                      f"valid ({cfg.valid_fraction}) and test "
                      f"({cfg.test_fraction}) users")
  return {"test": np.sort(order[:n_test]),
          "valid": np.sort(order[n_test:n_test + n_valid]),
          "train": np.sort(order[n_test + n_valid:])}


def output_ids(lines: UserLines, train_users: np.ndarray,
               task: str) -> list[str]:
  """Raw targets by output id (index 0 = ""): classes sorted; target items
  by frequency among the training users, the rest after them."""
  every = sorted({t for tgt in lines.targets for t in tgt})
  if task == "profile":
    return [""] + every
  counts: dict[str, int] = {t: 0 for t in every}
  for u in train_users:
    for t in lines.targets[u]:
      counts[t] += 1
  return [""] + sorted(every, key=lambda t: (-counts[t], t))


def source_room(max_len: int, causal: bool) -> int:
  """Source ids a model input keeps beside its CLS token(s)."""
  return max_len - (1 if causal else 2)


def model_inputs(ids: list[np.ndarray], max_len: int, causal: bool,
                 cls_id: int) -> np.ndarray:
  """[N, max_len] left-padded inputs: (source, CLS) or (CLS, source, CLS)."""
  room = source_room(max_len, causal)
  if room < 1:
    raise JaxrecError(f"data.max_len={max_len}: leaves no room for the "
                      "source sequence beside the CLS token(s)")
  out = np.zeros((len(ids), max_len), np.int32)
  for i, seq in enumerate(ids):
    seq = seq[-room:]
    row = (np.r_[seq, cls_id] if causal else np.r_[cls_id, seq, cls_id])
    out[i, max_len - len(row):] = row
  return out


def encode_sources(sources: list[list[str]], vocab: Vocabulary,
                   unk_id: int) -> tuple[list[np.ndarray], np.ndarray]:
  """(model ids per user, unknown ids per user): raw source ids through the
  pretraining vocabulary, an id it never saw as the UNK token (kept, so
  the model sees that something was there). Serving encodes histories
  with this too (`jaxrec.serving`), as the fine-tuning trained."""
  index = vocab.index()
  encoded = [np.array([index.get(str(s), unk_id) for s in src], np.int32)
             for src in sources]
  unknown = np.array([int(np.sum(ids == unk_id)) for ids in encoded],
                     np.int64)
  return encoded, unknown


def load(path: str, task: str, vocab: Vocabulary, cfg: DataConfig,
         max_len: int, causal: bool, cls_id: int, unk_id: int
         ) -> TransferData:
  """The downstream data of `task` from `path` (see the module docstring)."""
  lines = read_lines(path, task)
  users = split_users(len(lines.sources), cfg)
  outputs = output_ids(lines, users["train"], task)
  out_index = {t: i for i, t in enumerate(outputs)}
  encoded, unknown_per_user = encode_sources(lines.sources, vocab, unk_id)
  unknown = int(unknown_per_user.sum())
  inputs = model_inputs(encoded, max_len, causal, cls_id)

  def examples(split):
    rows = [(u, out_index[t]) for u in users[split]
            for t in lines.targets[u]]
    who = np.array([r[0] for r in rows], np.int64)
    return inputs[who], np.array([r[1] for r in rows], np.int32)

  train_x, train_y = examples("train")
  valid_x, valid_y = examples("valid")
  test_x, test_y = examples("test")
  counts = np.bincount(train_y, minlength=len(outputs)).astype(np.int64)
  meta = dict(source=path, task=task, format=FORMAT_VERSION,
              num_users={k: int(len(v)) for k, v in users.items()},
              num_examples={"train": len(train_y), "valid": len(valid_y),
                            "test": len(test_y)},
              num_outputs=len(outputs) - 1,
              source_tokens=int(sum(len(s) for s in lines.sources)),
              unknown_source_tokens=unknown, max_len=max_len)
  fingerprint = _fingerprint(path, task, vocab, cfg, max_len, causal)
  return TransferData(
      num_items=vocab.num_items,
      train=np.concatenate([train_x, train_y[:, None]], axis=1),
      valid_inputs=valid_x, valid_targets=valid_y, test_inputs=test_x,
      test_targets=test_y, item_counts=counts, fingerprint=fingerprint,
      meta=meta, vocab=vocab,
      outputs=Outputs(task, tuple(outputs), fingerprint))


def _fingerprint(path: str, task: str, vocab: Vocabulary, cfg: DataConfig,
                 max_len: int, causal: bool) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  h.update(json.dumps([FORMAT_VERSION, task, vocab.fingerprint(), max_len,
                       causal, cfg.valid_fraction, cfg.test_fraction,
                       cfg.split_seed]).encode())
  return h.hexdigest()[:16]


# ------------------------------------------------- a synthetic two-domain world


@dataclasses.dataclass(frozen=True)
class WorldSpec:
  """A source domain (`jaxrec.data.synthetic`) whose users' topic tastes
  also drive their target-domain items and their profile label."""
  source: str = "small"  # A synthetic size spec (users, items, topics, ...).
  target_items: int = 200  # Target-domain items, split over the same topics.
  targets_min: int = 2  # Target items per user, uniform in [min, max].
  targets_max: int = 6
  taste_share: float = 0.8  # A target from the user's topics, else popular.
  classes: int = 4  # Profile label: the user's main topic mod classes ...
  label_noise: float = 0.1  # ... replaced by a random class this often.
  seed: int = 0


WORLD_SIZES = {
    "tiny": WorldSpec(source="tiny", target_items=40, classes=3),
    # Many source items: as in the paper, the embedding is most of the
    # backbone (patches are a sixth of a conv layer at H = C/4).
    "small": WorldSpec(source="small,users=3000,items=5000"),
    "large": WorldSpec(source="medium", target_items=2_000, classes=8),
}


def synthetic_world(out_dir: str, spec: WorldSpec) -> dict[str, str]:
  """Writes `source.csv` (user_id,item_id,timestamp: pretraining data),
  `cold_start.txt` and `profile.txt`; returns their paths. Target items
  are `t<n>`, labels `c<n>`."""
  src_spec = synthetic.parse_size(spec.source)
  world = synthetic.make_world(src_spec)
  events = synthetic.generate_spec(src_spec)
  rng = np.random.default_rng([spec.seed, 0x7472])
  topics = src_spec.topics
  target_topic = rng.permutation(np.arange(spec.target_items) % topics)
  popularity = 1.0 / np.arange(1, spec.target_items + 1)
  rng.shuffle(popularity)
  os.makedirs(out_dir, exist_ok=True)
  paths = {name: os.path.join(out_dir, f"{name}.{ext}") for name, ext in
           (("source", "csv"), ("cold_start", "txt"), ("profile", "txt"))}
  with open(paths["source"], "w", encoding="utf-8") as f:
    f.write("user_id,item_id,timestamp\n")
    for u, i, t in zip(events.users, events.items, events.timestamps):
      f.write(f"{u},{i},{t}\n")
  starts = np.r_[0, np.cumsum(world.lengths)]
  cold, prof = [], []
  for u in range(src_spec.users):
    source = ",".join(map(str, events.items[starts[u]:starts[u + 1]]))
    main = int(world.user_topics[u, np.argmax(world.user_weights[u])])
    count = rng.integers(spec.targets_min, spec.targets_max + 1)
    chosen: list[int] = []
    while len(chosen) < count:
      if rng.random() < spec.taste_share:
        topic = rng.choice(world.user_topics[u], p=world.user_weights[u])
        pool = np.flatnonzero(target_topic == topic)
      else:
        pool = np.arange(spec.target_items)
      weights = popularity[pool] / popularity[pool].sum()
      item = int(rng.choice(pool, p=weights))
      if item not in chosen:
        chosen.append(item)
    label = (main % spec.classes if rng.random() >= spec.label_noise
             else int(rng.integers(spec.classes)))
    cold.append(f"{source},,{','.join(f't{i + 1}' for i in chosen)}\n")
    prof.append(f"{source},,c{label}\n")
  for name, rows in (("cold_start", cold), ("profile", prof)):
    with open(paths[name], "w", encoding="utf-8") as f:
      f.writelines(rows)
  return paths
