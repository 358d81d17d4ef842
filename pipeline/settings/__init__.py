"""The typed, frozen settings of each stage: one module per stage, torch-free.

These dataclasses are the one source of defaults: `pipeline X --help` shows them, params.yaml
repeats them (a test checks that it does), and each stage's logic module imports its own. They
import nothing heavy, so the CLI builds its help from them without loading torch, and each DVC
stage depends on exactly its own settings module.
"""

DEVICES = ("auto", "cpu", "cuda")
