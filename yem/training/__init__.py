"""The training run: flow-matching objective, batching, the loop, its state, checkpoints and stop requests.

May import the top level, yem.hardware, yem.model and yem.data; never yem.outputs or the stages.
"""
