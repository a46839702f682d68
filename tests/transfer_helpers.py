"""A tiny two-domain world and a backbone pretrained on its source, for
the fine-tuning tests."""
from jaxrec import config
from jaxrec.data import transfer
from jaxrec.training import loop


def pretrained_tiny_world(root, backbone: str, steps: int = 4):
  """Writes ROOT/world (the tiny world) and ROOT/pre (`backbone`, C=8, two
  blocks, trained `steps` steps on the source); returns the world's paths."""
  paths = transfer.synthetic_world(str(root / "world"),
                                   transfer.WORLD_SIZES["tiny"])
  model = config.model_config_class(backbone)(embed_dim=8, num_blocks=2,
                                              dropout=0.0)
  cfg = config.Config(
      model=model,
      data=config.DataConfig(source="csv:" + paths["source"], max_len=12,
                             min_item_count=2),
      train=config.TrainConfig(steps=steps, eval_every=steps,
                               batch_size=16))
  loop.train(cfg, str(root / "pre"), progress_bar=False)
  return paths
