"""Evaluation against the teacher's full distribution (`scores`) and the report (`report`)."""
