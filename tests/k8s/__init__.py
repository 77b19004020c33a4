"""A real Kubernetes control plane for tests ("envtest" style): etcd, kube-apiserver and
kube-controller-manager built from their Go modules, no kubelet. See testenv.py."""
