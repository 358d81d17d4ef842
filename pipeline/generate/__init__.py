"""The teacher's own answers to prompts, as chat records prepare-corpus reads (sequence-level KD)."""
