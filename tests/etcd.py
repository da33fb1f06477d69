"""Real etcd servers for tests: segue's own launcher (segue/etcd_cluster.py), which chaos
and the fleet benchmark use too."""

from segue.etcd_cluster import ETCD, Etcd, EtcdMember, free_port

__all__ = ["ETCD", "Etcd", "EtcdMember", "free_port"]
