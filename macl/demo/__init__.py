"""`macl demo`: pre-train on the built-in phantom, fine-tune with few labels, a Dice table against scratch.

Open `pipeline.py` first (`run_demo` and its table / figures); `stats.py` holds the paired tests across seeds.
"""
from .pipeline import DemoConfig, format_table, run_demo, table_rows, write_figures

__all__ = ["DemoConfig", "run_demo", "table_rows", "format_table", "write_figures"]
