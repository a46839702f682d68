"""Surgery: pure transforms of a param tree (and its config), and the one
way to apply any of them to a saved run (`checkpoint.apply_to_checkpoint`).

- `growth`: StackRec, blocks stacked into a deeper model;
- `heads`: a new output head (transfer to a target domain).
"""
