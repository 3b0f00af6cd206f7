"""Decoder service (`python -m worldstream.decoder`): the public WorldSession API over the engine's block loop."""
