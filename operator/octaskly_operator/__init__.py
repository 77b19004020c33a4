"""The octaskly Kubernetes operator (kopf): OctasklyCluster → dispatchers, workers,
backups, key rotation. Run it with `octaskly-operator` (pip install 'octaskly[operator]').

Named `octaskly_operator`, never `operator`, which would shadow the standard library."""
