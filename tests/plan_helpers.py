"""A block plan made without any method, for backbone tests."""
from jaxrec import method_api


def gate_plan(gates):
  """A BlockPlan whose `branch` slot scales block l's branch by gates[l]
  [B] (what SkipRec puts there)."""
  def gate(x_in, h, g):
    del x_in
    return g[:, None, None] * h
  return method_api.BlockPlan(slots=(("branch", (("gate", gate),)),),
                              side={"gate": gates})
