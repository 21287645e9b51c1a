"""Shared storage check: on a multi-node cluster, a local OUT and local inputs must be one filesystem that every node sees.

The shard-writing tasks write into OUT from every node, the driver commits them from whichever node the job landed on
(inside `ray job submit`), and the decode tasks read the inputs on every node. A folder that exists on one node only would scatter the runs' outputs over
the nodes' disks (a re-submit landing elsewhere would start from zero) and fail every image decoded elsewhere. So the
driver writes a sentinel file into OUT and one task pinned to each alive node looks for it, and for one listed input,
before any image is embedded. Nodes that join later (autoscaling) are not checked.
"""

from __future__ import annotations

import os
import uuid

from embedder.config import UserError, is_uri
from embedder.writer import OutDir

# Test hook: the node with this id reports every path missing, as a node without the shared filesystem would.
HIDE_ON_NODE_ENV = "IMGINDEX_TEST_HIDE_SENTINEL_ON_NODE"
SENTINEL_PREFIX = ".imgindex-shared-check-"


def missing_here(paths: list[str], hide_on_node: str | None) -> list[str]:
    """The `paths` this node does not see (run as a Ray task pinned to one node)."""
    import ray

    if hide_on_node and ray.get_runtime_context().get_node_id() == hide_on_node:
        return list(paths)
    return [p for p in paths if not os.path.exists(p)]


def check_shared_storage(out: str, sample_input: str) -> None:
    """Refuse a local OUT or input that some alive node of a multi-node cluster cannot see; URIs and one node pass."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2 or (is_uri(out) and is_uri(sample_input)):
        return
    paths = [] if is_uri(sample_input) else [sample_input]
    folder = OutDir(out)
    sentinel = f"{SENTINEL_PREFIX}{uuid.uuid4().hex}"
    if not is_uri(out):
        folder.write_bytes(sentinel, b"written by the imgindex driver; removed after the check\n")
        paths.append(folder.path(sentinel))
    probe = ray.remote(num_cpus=0)(missing_here)
    hide = os.environ.get(HIDE_ON_NODE_ENV)
    try:
        answers = ray.get([
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(paths, hide)
            for n in nodes
        ])
    finally:
        if not is_uri(out):
            folder.delete(sentinel)
    blind = [(n, missing) for n, missing in zip(nodes, answers) if missing]
    if not blind:
        return
    node, missing = blind[0]
    what = f"--out {out}" if not is_uri(out) and paths[-1] in missing else f"input {missing[0]}"
    raise UserError(
        f"{what} is not on storage every node sees: node {node['NodeManagerAddress']} ({node['NodeID'][:8]}"
        f"{f', and {len(blind) - 1} more' if len(blind) > 1 else ''}) cannot see it; on a multi-node cluster use a "
        "filesystem mounted at the same path on every node, or s3:// / gs:// URIs"
    )
