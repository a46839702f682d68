"""Tasks: what a run optimises and how it is evaluated.

A task provides `loss(params, cfg, batch, rng, sampler) -> scalar`,
`batch(data, step, batch_size, seed) -> dict` (a pure function of the
step, so a resume replays exactly), and `rank_fn(cfg)` /
`sampled_rank_fn(cfg)` for evaluation. `next_item` is the sequential
recommendation task every backbone trains on; a classification task comes
with PeterRec.
"""
