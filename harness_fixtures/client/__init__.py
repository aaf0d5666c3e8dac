"""The streaming client: the protocol-level HTTP path, one event loop per process, optional fan-out
over worker processes, the request log and the client's own statistics."""
