"""`jaxrec predict`: top-k recommendations in raw item ids."""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from typing import Any

from jaxrec.errors import JaxrecError, reported_as


def add_parser(sub: Any) -> argparse.ArgumentParser:
  p = sub.add_parser(
      "predict", help="top-k items for histories of raw item ids",
      description="Top-k recommendations of a run's checkpoint for "
      "histories of raw item ids (oldest first), with the head's scores. "
      "Unknown raw ids are dropped and counted; a history with no known "
      "id gets the popularity ranking (marked fallback=popularity, no "
      "scores). A fine-tuning (jaxrec finetune) takes source-domain "
      "histories (unknown ids read as its UNK token) and answers in its "
      "outputs' names: target items (cold_start) or labels (profile).")
  p.add_argument("--ckpt", required=True, metavar="DIR",
                 help="run directory (its best checkpoint, else latest)")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--history", metavar="'RAW RAW ...'",
                   help="one history: raw item ids separated by spaces")
  src.add_argument("--input", metavar="FILE",
                   help="one history per line: raw item ids separated by "
                        "spaces, or a JSON object {\"id\": ..., "
                        "\"history\": [RAW, ...]}; '-' reads stdin")
  p.add_argument("--topk", type=int, default=10, metavar="K",
                 help="items per history (default: 10)")
  p.add_argument("--exclude-seen", action="store_true",
                 help="never recommend an item of the history (refused "
                      "for a fine-tuning)")
  p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl",
                 help="jsonl: one object per history; csv: one row per "
                      "recommended item (default: jsonl)")
  return p


def read_histories(path: str) -> tuple[list[Any], list[list[str]]]:
  """(ids, histories) of an --input file (see --input's help)."""
  ids, histories = [], []
  stream = sys.stdin if path == "-" else None
  with reported_as(path, "read the histories"):
    f = stream or open(path, encoding="utf-8")
    try:
      lines = f.read().splitlines()
    finally:
      if stream is None:
        f.close()
  for lineno, line in enumerate(lines, start=1):
    text = line.strip()
    if text.startswith("{"):
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        raise JaxrecError(f"{path}:{lineno}: not valid JSON: {e.msg}"
                          ) from None
      history = obj.get("history") if isinstance(obj, dict) else None
      if not isinstance(history, list):
        raise JaxrecError(f"{path}:{lineno}: expected a JSON object with a "
                          "list 'history'")
      ids.append(obj.get("id", len(ids)))
      histories.append([str(x) for x in history])
    else:
      ids.append(len(ids))
      histories.append(text.split())
  return ids, histories


def run(args: argparse.Namespace) -> None:
  from jaxrec import serving  # pylint: disable=import-outside-toplevel
  serving.check_k_option(args.topk)  # Before the checkpoint is read.
  if args.history is not None:
    ids, histories = [0], [args.history.split()]
  else:
    ids, histories = read_histories(args.input)
  predictor = serving.Predictor(args.ckpt)
  preds = predictor.topk(histories, args.topk, args.exclude_seen)
  unknown = sum(p.unknown for p in preds)
  if unknown:
    rows = sum(1 for p in preds if p.unknown)
    if predictor.finetuning:
      print(f"jaxrec: warning: {unknown} unknown source ids in {rows} of "
            f"{len(preds)} histories read as the UNK token",
            file=sys.stderr)
    else:
      print(f"jaxrec: warning: dropped {unknown} unknown item ids from "
            f"{rows} of {len(preds)} histories", file=sys.stderr)
  fallback = sum(1 for p in preds if p.fallback)
  if fallback:
    print(f"jaxrec: warning: {fallback} of {len(preds)} histories had no "
          "known item id; they get the popularity ranking "
          "(fallback=popularity)", file=sys.stderr)
  sys.stdout.write(format_predictions(ids, preds, args.format))


def format_predictions(ids: list[Any], preds: list[Any], fmt: str) -> str:
  """jsonl: {"id", "items", "scores", "unknown", "fallback"} per history;
  csv: id,rank,item,score,fallback per recommended item (rank from 1)."""
  if fmt == "jsonl":
    return "".join(json.dumps({"id": i, "items": p.items, "scores": p.scores,
                               "unknown": p.unknown, "fallback": p.fallback})
                   + "\n" for i, p in zip(ids, preds))
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["id", "rank", "item", "score", "fallback"])
  for i, p in zip(ids, preds):
    for rank, item in enumerate(p.items, start=1):
      score = "" if p.scores is None else f"{p.scores[rank - 1]:.6g}"
      writer.writerow([i, rank, item, score, p.fallback or ""])
  return out.getvalue()
