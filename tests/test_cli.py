"""The `jaxrec` command: outputs, config layering and one-line errors."""
import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from jaxrec import cli
from jaxrec import config
from jaxrec.cli import flags

from cli_helpers import TINY, run_error


def test_train_writes_metrics_config_and_checkpoints(trained_run):
  with open(os.path.join(trained_run, "metrics.json")) as f:
    metrics = json.load(f)
  for split in ("valid", "test", "popularity"):
    assert {"mrr@5", "hr@5", "ndcg@5", "mrr@10", "hr@10", "ndcg@10",
            "mrr@20", "hr@20", "ndcg@20"} <= set(metrics[split])
  assert metrics["steps"] == 6 and "train_time_s" in metrics
  with open(os.path.join(trained_run, "config.json")) as f:
    assert json.load(f)["model"]["num_blocks"] == 2
  assert os.listdir(os.path.join(trained_run, "checkpoints", "best"))


def test_train_prints_test_metrics_next_to_popularity(tmp_path, capsys):
  assert cli.main(["train", "--out", str(tmp_path)] + TINY) == 0
  out = capsys.readouterr().out
  assert "popularity" in out and "ndcg@10" in out


def test_eval_prints_full_ranking_metrics(trained_run, capsys):
  assert cli.main(["eval", "--ckpt", trained_run]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["ranking"] == "full"
  assert set(out) >= {"valid", "test", "popularity_test"}


def read_metrics(run_dir):
  with open(os.path.join(run_dir, "metrics.json")) as f:
    return json.load(f)


def test_eval_reproduces_the_metrics_of_training(trained_run, capsys):
  trained = read_metrics(trained_run)
  assert cli.main(["eval", "--ckpt", trained_run]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["checkpoint_step"] == trained["best_step"]
  assert out["valid"] == trained["valid"]
  assert out["test"] == trained["test"]
  assert out["popularity_test"] == trained["popularity"]


def test_eval_sampled_is_labelled_sampled(trained_run, capsys):
  assert cli.main(["eval", "--ckpt", trained_run, "--split", "test",
                   "--sampled", "10"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["ranking"] == "sampled:10" and out["test"]["ranking"] == "sampled:10"


def test_eval_sampled_ranks_among_one_positive_and_n_negatives(trained_run,
                                                                capsys):
  assert cli.main(["eval", "--ckpt", trained_run, "--split", "test",
                   "--sampled", "10"]) == 0
  sampled = json.loads(capsys.readouterr().out)["test"]
  # 1 positive + 10 negatives: every rank is < 11, so every target is in the
  # top 20, which the full ranking over all items does not give.
  assert sampled["hr@20"] == 1.0 and sampled["mrr@20"] >= 1 / 11
  assert read_metrics(trained_run)["test"]["hr@20"] < 1.0


def test_inspect_shows_shapes_counts_and_lineage(trained_run, capsys):
  assert cli.main(["inspect", trained_run]) == 0
  out = capsys.readouterr().out
  assert "blocks/conv1/kernel" in out and "(2, 3, 8, 8)" in out
  assert "lineage" in out and "all" in out


def test_config_file_is_read_and_flags_override_it(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("model:\n  num_blocks: 6\n  dilations: [1, 2]\n"
                  "train:\n  steps: 99\n")
  args = cli.build_parser().parse_args(
      ["train", "--out", "x", "--config", str(path), "--steps", "7"])
  cfg = flags.config_from_args(args)
  assert cfg.model.num_blocks == 6 and cfg.model.dilations == (1, 2)
  assert cfg.train.steps == 7


def test_model_flag_picks_the_backbone_and_its_options(tmp_path):
  args = cli.build_parser().parse_args(
      ["train", "--out", "x", "--model", "sasrec", "--num-heads", "2",
       "--dropout", "0.1", "--tie-embeddings", "true"])
  cfg = flags.config_from_args(args)
  assert cfg.model.name == "sasrec" and cfg.model.num_heads == 2
  assert cfg.model.dropout == 0.1 and cfg.head.tie_embeddings is True


def test_a_flag_of_another_backbone_is_refused_naming_it(tmp_path, capsys):
  line = run_error(capsys, ["train", "--out", str(tmp_path), "--num-heads",
                            "2"] + TINY)
  assert "--num-heads: not an option of model 'nextitnet'" in line


def test_an_unknown_model_name_lists_the_registered_ones(tmp_path, capsys):
  line = run_error(capsys, ["train", "--out", str(tmp_path), "--model",
                            "no-such-model"] + TINY)
  assert "model.name='no-such-model'" in line and "sasrec" in line


def test_a_version_1_config_file_is_upgraded(tmp_path):
  path = tmp_path / "old.json"
  path.write_text(json.dumps({"version": 1, "model": {
      "num_blocks": 3, "tie_embeddings": True}}))
  args = cli.build_parser().parse_args(
      ["train", "--out", "x", "--config", str(path)])
  cfg = flags.config_from_args(args)
  assert cfg.model.name == "nextitnet" and cfg.model.num_blocks == 3
  assert cfg.head.tie_embeddings is True


def test_help_documents_every_option(capsys):
  with pytest.raises(SystemExit):
    cli.main(["train", "--help"])
  text = capsys.readouterr().out
  words = " ".join(text.split())
  seen = 0
  for flag, (_, _, owners) in flags.fields_by_flag().items():
    assert flag in text, flag
    for cls, field in owners:  # Every field of every section documented...
      assert config.help_of(field), f"{cls.__name__}.{field.name}"
      seen += 1
    # ...and --help shows it (a field several backbones share shows one).
    assert config.help_of(owners[0][1])[:30] in words, flag
  assert seen == sum(len(dataclasses.fields(cls))
                     for section in config.SECTIONS
                     for cls in flags.section_classes(section))


def test_unknown_option_value_names_the_option(tmp_path, capsys):
  line = run_error(capsys, ["train", "--out", str(tmp_path), "--residual",
                            "foo"] + TINY)
  assert "model.residual" in line


def test_non_numeric_flag_names_the_flag(tmp_path, capsys):
  line = run_error(capsys, ["train", "--out", str(tmp_path), "--steps",
                            "ten"])
  assert "--steps" in line


def test_a_run_directory_orbax_cannot_read_back_is_refused_before_training(
    tmp_path, capsys):
  out = tmp_path / "sweep[lr=3e-3]"
  line = run_error(capsys, ["train", "--out", out] + TINY)
  assert str(out) in line and "'['" in line
  assert not (out / "checkpoints").exists()


def test_unknown_flag_is_one_line(capsys):
  line = run_error(capsys, ["train", "--out", "x", "--no-such-flag", "1"])
  assert "--no-such-flag" in line


def test_missing_data_file_names_the_file(tmp_path, capsys):
  missing = str(tmp_path / "nope.csv")
  line = run_error(capsys, ["train", "--out", str(tmp_path / "o"),
                            "--data", f"csv:{missing}"])
  assert "nope.csv" in line


def test_malformed_row_names_file_and_line(tmp_path, capsys):
  path = tmp_path / "bad.csv"
  path.write_text("user_id,item_id,timestamp\n1,2,3\n1,3\n")
  line = run_error(capsys, ["train", "--out", str(tmp_path / "o"),
                            "--data", f"csv:{path}"])
  assert f"{path}:3:" in line and "expected 3 fields" in line


def test_non_numeric_timestamp_names_file_and_line(tmp_path, capsys):
  path = tmp_path / "ts.csv"
  path.write_text("user_id,item_id,timestamp\n1,2,3\n1,3,yesterday\n")
  line = run_error(capsys, ["train", "--out", str(tmp_path / "o"),
                            "--data", f"csv:{path}"])
  assert f"{path}:3:" in line and "'yesterday'" in line


def test_data_empty_after_filtering_names_the_filter(tmp_path, capsys):
  path = tmp_path / "few.csv"
  path.write_text("user_id,item_id,timestamp\n1,2,3\n1,3,4\n2,2,5\n")
  line = run_error(capsys, ["train", "--out", str(tmp_path / "o"),
                            "--data", f"csv:{path}"])
  assert "data.min_user_count=5" in line and "data.min_item_count=5" in line


def test_bad_config_file_key_names_the_key(tmp_path, capsys):
  path = tmp_path / "c.yaml"
  path.write_text("model:\n  num_blockz: 6\n")
  line = run_error(capsys, ["train", "--out", "x", "--config", str(path)])
  assert "c.yaml" in line and "num_blockz" in line


def test_invalid_yaml_names_file_and_line(tmp_path, capsys):
  path = tmp_path / "c.yaml"
  path.write_text("model:\n  num_blocks: [1\n")
  line = run_error(capsys, ["train", "--out", "x", "--config", str(path)])
  assert "c.yaml:" in line


def test_resume_with_another_config_is_refused(trained_run, capsys):
  line = run_error(capsys, ["train", "--out", trained_run, "--resume"]
                   + TINY + ["--embed-dim", "16"])
  assert "embed_dim" in line


def test_checkpoint_of_another_catalogue_is_refused(trained_run, capsys):
  line = run_error(capsys, ["eval", "--ckpt", trained_run, "--data",
                            "synthetic:small"])
  assert "items the checkpoint" in line and "never saw" in line


def test_eval_of_a_directory_without_checkpoints(tmp_path, capsys):
  line = run_error(capsys, ["eval", "--ckpt", str(tmp_path)])
  assert str(tmp_path) in line


def test_a_failed_resume_leaves_the_checkpoint_restorable(trained_run,
                                                          capsys):
  line = run_error(capsys, ["train", "--out", trained_run, "--resume"] + TINY
                   + ["--num-blocks", "3"])
  assert "model.num_blocks: 2 -> 3" in line
  assert cli.main(["eval", "--ckpt", trained_run, "--split", "test"]) == 0


def test_grow_then_inspect_shows_the_lineage(trained_run, tmp_path, capsys):
  grown = str(tmp_path / "grown")
  assert cli.main(["grow", "--from", trained_run, "--out", grown,
                   "--method", "adjacent", "--preset", "paper"]) == 0
  capsys.readouterr()
  assert cli.main(["inspect", grown]) == 0
  out = capsys.readouterr().out
  assert "(4, 3, 8, 8)" in out  # 2 blocks grown to 4.
  assert "op=grow" in out and "method=adjacent" in out


def test_grow_into_a_directory_holding_checkpoints_is_refused(trained_run,
                                                              capsys):
  line = run_error(capsys, ["grow", "--from", trained_run, "--out",
                            trained_run, "--method", "cross"])
  assert f"{trained_run}: already holds files (checkpoints, config.json" in line


def test_sasrec_takes_every_path_nextitnet_has(tmp_path, capsys):
  """train (sampled loss) -> eval -> resume -> grow -> init-from -> inspect,
  all with --model sasrec."""
  run, grown, tuned = (str(tmp_path / n) for n in ("s", "g", "t"))
  sasrec = ["--model", "sasrec", "--num-heads", "2", "--residual", "alpha",
            "--dropout", "0.1", "--loss", "sampled", "--num-samples", "20"]
  argv = ["train", "--out", run] + TINY + sasrec
  assert cli.main(argv) == 0
  with open(os.path.join(run, "metrics.json")) as f:
    trained = json.load(f)
  assert trained["backbone"] == "sasrec"
  capsys.readouterr()
  assert cli.main(["eval", "--ckpt", run, "--split", "test"]) == 0
  evaluated = json.loads(capsys.readouterr().out)
  assert evaluated["test"] == trained["test"]
  assert cli.main(argv + ["--steps", "9", "--resume"]) == 0
  with open(os.path.join(run, "metrics.json")) as f:
    assert json.load(f)["steps"] == 9
  assert cli.main(["grow", "--from", run, "--out", grown, "--method",
                   "adjacent", "--preset", "preserve"]) == 0
  assert cli.main(["train", "--out", tuned, "--init-from", grown] + TINY
                  + ["--loss", "sampled", "--num-samples", "20"]) == 0
  capsys.readouterr()
  assert cli.main(["inspect", tuned]) == 0
  out = capsys.readouterr().out
  assert "model: sasrec (" in out and "num_blocks=4" in out
  assert "blocks/attention/query/kernel" in out
  assert "op=grow" in out and "op=init_from" in out


# ------------------------------------------------------ --mask-history


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("masked"))
  assert cli.main(["train", "--out", out, "--mask-history", "true"]
                  + TINY) == 0
  return out


def test_train_with_mask_history_records_it(masked_run):
  assert read_metrics(masked_run)["mask_history"] is True


def test_eval_with_mask_history_reproduces_training(masked_run, capsys):
  trained = read_metrics(masked_run)
  assert cli.main(["eval", "--ckpt", masked_run, "--mask-history"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["mask_history"] is True
  assert out["valid"] == trained["valid"] and out["test"] == trained["test"]
  assert out["popularity_test"] == trained["popularity"]


def test_masked_metrics_are_at_least_the_unmasked(masked_run, capsys):
  assert cli.main(["eval", "--ckpt", masked_run, "--split", "test"]) == 0
  plain = json.loads(capsys.readouterr().out)
  masked = read_metrics(masked_run)
  for name in config.METRIC_NAMES:
    assert masked["test"][name] >= plain["test"][name], name
    assert masked["popularity"][name] >= plain["popularity_test"][name], name
  # Masking acted: seen items no longer push targets down.
  assert masked["test"]["mrr@20"] > plain["test"]["mrr@20"]
  assert masked["popularity"]["mrr@20"] > plain["popularity_test"]["mrr@20"]


# --------------------------------------------------------- --distributed

DISTRIBUTED = """
import json, sys
from jaxrec import cli
code = cli.main(sys.argv[1:])
import jax
print(json.dumps({"code": code, "initialized": jax.distributed.is_initialized(),
                  "processes": jax.process_count()}))
"""


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_train_distributed_on_one_local_process(tmp_path):
  port = free_port()
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("SLURM_") and "_proxy" not in k.lower()}
  env.update({
      "JAX_PLATFORMS": "cpu",
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0",
      # jax.distributed.initialize() reads the process count and id only from
      # a cluster it detects: a one-task Slurm step on this host gives them.
      "SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "127.0.0.1",
      "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})
  out = str(tmp_path / "run")
  proc = subprocess.run(
      [sys.executable, "-c", textwrap.dedent(DISTRIBUTED), "train",
       "--distributed", "--out", out] + TINY,
      capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result == {"code": 0, "initialized": True, "processes": 1}
  assert read_metrics(out)["steps"] == 6


def test_distributed_outside_a_cluster_is_one_line(tmp_path, capsys,
                                                   monkeypatch):
  for name in list(os.environ):
    if name.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "TPU_")):
      monkeypatch.delenv(name)
  line = run_error(capsys, ["train", "--out", str(tmp_path), "--distributed"]
                   + TINY)
  assert "--distributed: jax.distributed.initialize() failed" in line


def test_freeze_flag_keeps_slashes_inside_path_patterns():
  args = cli.build_parser().parse_args(
      ["train", "--out", "x", "--freeze", "item_embedding/.*, blocks/.*",
       "--dilations", "1/4"])
  cfg = flags.config_from_args(args)
  assert cfg.train.freeze == ("item_embedding/.*", "blocks/.*")
  assert cfg.model.dilations == (1, 4)
