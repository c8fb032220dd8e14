"""The run folder as a small database: atomic files, one writer at a time, logs that survive a crash.

Open `folder.py` first (what every command writing a run relies on). `files.py` holds the write primitives,
`lock.py` the writer's lock, `rerun_checks.py` what a rerun may change, `tensorboard_log.py` the optional mirror,
`validation.py` fine-tuning's validation curve and kept best step.
"""
