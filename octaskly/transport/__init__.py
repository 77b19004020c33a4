"""P2P transports. Every transport carries the same framed messages (protocol.framing);
nothing above this package knows which one is in use."""
