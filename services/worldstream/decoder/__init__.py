"""Decoder service (`python -m worldstream.decoder`): the public WorldSessionService API over the engine's block loop."""
