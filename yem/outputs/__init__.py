"""What people look at: validation renders, the model card with its LoRA files, and plots.

May import every layer below (top level, hardware, model, data, training); nothing imports it but the stages.
"""
