"""The DVC pipeline as one program: `yem train` runs `dvc repro` in a process group of its own that stops as one
(`group`), with dvc's chatter left out and each outcome said once (`repro`); `runs` compares the experiments; `options`
is what the one-liner may write into params.yaml. May import every layer below the commands (doctor, cli)."""
