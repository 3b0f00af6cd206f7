"""The API layer both sides share: action spaces (`spaces`), the block frame layout (`layout`), the reference
benchmark trajectories (`benchmark`), trajectory files (`trajectory`), and the conversions between them and
`worldstream.v1` messages (`messages`). Light: no torch, no model code."""
