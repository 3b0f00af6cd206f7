"""Condition-encoder service (`python -m worldstream.encoder`) and its client used by decoders."""
