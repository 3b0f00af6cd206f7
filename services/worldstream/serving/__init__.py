"""The gRPC plumbing both services share, free of any model code: errors and their status codes, structured
logs, Prometheus metrics, asyncio helpers for streaming calls, per-stream profiling, health and readiness, the
one start-up path (`bootstrap.serve`) and the launcher of service processes."""
