"""The API layer both sides share: action spaces and the block frame layout, trajectory files, and the
conversions between them and `worldstream.v1` messages. Light: no torch, no model code."""
