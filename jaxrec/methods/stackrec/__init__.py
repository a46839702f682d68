"""StackRec (Wang et al., SIGIR 2021): a trained shallow model's blocks
stacked, adjacent- or cross-wise, into a deeper one that then trains on.

growth.py   the index maps (adjacent, cross, random_top, embed_only; top-k),
            the presets (paper, preserve, full), `stack` on a param tree,
            `stack_opt_state` on Adam's moments, `grow_checkpoint` on a run;
            `jaxrec grow` calls it

StackRec acts once, on a saved tree, so it registers no forward-time hooks:
a grown model is a plain model of the deeper config, with the growth in its
checkpoint's lineage. It works on every backbone through its surgery rules
(`models.SurgeryRules`: block stacks, norms, gates), and it moves the active
methods' block-axis subtrees (`Method.stacks`: SkipRec's head rows,
PeterRec's patches) by the same index map.
"""
