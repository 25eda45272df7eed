"""Local input/output paths on a multi-node cluster: refused unless on a shared file system
(the check on a real cluster, marker read from the other nodes: tests/test_multinode.py)."""

from __future__ import annotations

import pytest


def test_local_paths_on_a_multinode_cluster_are_refused_without_shared_filesystem(
        tmp_path, monkeypatch):
    import ray

    from restorer.errors import SpecError
    from restorer.pipeline.runtime import refuse_unshared_paths

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeID": "a"},
                                               {"Alive": True, "NodeID": "b"}])
    with pytest.raises(SpecError, match="cluster has 2 nodes.*--shared-filesystem"):
        refuse_unshared_paths(str(tmp_path / "in"), "s3://b/out", str(tmp_path), False)
    assert refuse_unshared_paths("s3://b/in", "s3://b/out", "s3://b/out/_restorer", False) == []
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeID": "a"},
                                               {"Alive": False, "NodeID": "b"}])
    assert refuse_unshared_paths(str(tmp_path), str(tmp_path), str(tmp_path), False) == []
