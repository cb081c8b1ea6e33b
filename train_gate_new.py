"""The README's entry point for width-dynamic (--w_dynamic) and width+depth-dynamic (--wd_dynamic
--early_exit) inference. It takes exactly train_gate.py's flags and runs the same code (the reference
ships no such file; its scripts run every mode through train_gate.py)."""

from train_gate import main
from transformers_ext.cli import run_cli

if __name__ == "__main__":
    run_cli(main)
