"""Generated protobuf and gRPC stubs for gradserve.v1 (run `make proto`)."""
