"""The `worldstream.v1` API: protobuf and gRPC modules generated from `protos/worldstream/v1/*.proto` when the
`worldstream-client` distribution is built or installed (never committed, never generated at run time)."""
