"""What nodes and coordinators share, below both: the etcd store, membership records, the
ring, peer channels, the checkpoint and session-transfer formats, request validation and
error mapping, and the client-facing service adapter. Imports run one way:
client -> coordinator -> cluster <- node."""
