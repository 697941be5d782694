"""The wire contract's Python side, shared by client and server: dtypes, tensor specs,
pytrees, the codec (pytree <-> ``Value``), the framing (headers, chunks, slot references)
and the slots of same-host sessions. The generated stubs are ``gradserve.v1``."""
