"""Surgery: pure transforms of a param tree (and its config), and the one
way to apply any of them to a saved run (`checkpoint.apply_to_checkpoint`).

- `heads`: a new output head (transfer to a target domain);
- `parts`: a network inside a backbone taken out as a model of its own
  (GRec's encoder, a bidirectional NextItNet);
- `catalogue`: item rows moved to a new vocabulary;
- `diff`: what a surgery did, leaf by leaf.

StackRec's growth and CpRec's untying are methods' (`jaxrec.methods.stackrec`,
`jaxrec.methods.cprec.sharing`), built on these.
"""
