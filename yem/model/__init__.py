"""SD3 itself: loading, the offline tiny model, its architecture and memory footprint, the LoRA and its files.

May import the top-level modules and yem.hardware; never data, training, outputs, or the stages.
"""
