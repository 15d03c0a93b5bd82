"""The machine: device and precision, memory (readings, budget, peaks, running out), heat, power, processes.

May import the top-level modules (errors, params, schema, paths, atomic, progress) and nothing else of yem.
"""
