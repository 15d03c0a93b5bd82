"""Heat: sensors that read how hot the training device runs (one file each), and the governor that decides
whether training goes on, pauses or stops. May import the top-level modules only."""
