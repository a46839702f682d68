"""Surgery: pure transforms of a param tree (and its config), and the one
way to apply any of them to a saved run (`checkpoint.apply_to_checkpoint`).

- `heads`: a new output head (transfer to a target domain);
- `sharing`: untying a model whose blocks are shared;
- `catalogue`: item rows moved to a new vocabulary;
- `diff`: what a surgery did, leaf by leaf.

StackRec's growth is a method (`jaxrec.methods.stackrec`) built on these.
"""
