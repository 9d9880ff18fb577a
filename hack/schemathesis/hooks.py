"""Schemathesis hooks for sandboxd-o's API fuzzing (hack/schemathesis/run.sh loads them).

- A tar upload has no serializer in Schemathesis: each generated body is sent as an empty archive,
  which is a valid tar, so the route is still exercised with its parameters.
- JSON Schema cannot relate one item of a sandbox spec to another. The server refuses, with 400,
  container names used twice, a container port or pinned host port used twice per protocol, and a
  readiness probe whose port is not a tcp port of the spec or which has a path but probes tcp.
  `map_body` repairs generated specs in exactly those relations and nothing else: it renames
  duplicate names and ports that are already valid, unpins a duplicate host port, and adds or
  retypes entries that are already valid, so a body that violates the schema still violates it
  afterwards and negative tests keep their teeth.
"""

import re

import schemathesis

# Two 512-byte zero blocks: the end-of-archive marker, i.e. a valid empty tar.
EMPTY_TAR = b"\0" * 1024

NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
SPEC_OPERATIONS = {"POST /api/v1/sandboxes", "PUT /api/v1/sandboxes/{id}", "POST /api/v1/nodes/{name}/sandboxes"}


@schemathesis.serializer("application/x-tar")
def tar_serializer(ctx, value):
    return EMPTY_TAR


def _is_port(value):
    # A whole float (80.0) is the integer it equals, for the schema and for the server alike.
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return whole and not isinstance(value, bool) and 1 <= value <= 65535


def _unique_container_names(containers):
    seen = set()
    for index, container in enumerate(containers):
        if not isinstance(container, dict):
            continue
        name = container.get("name")
        if isinstance(name, str) and NAME.match(name) and name in seen:
            candidate = f"c{index}"
            while candidate in seen:
                candidate += "x"
            container["name"] = candidate
            name = candidate
        if isinstance(name, str):
            seen.add(name)


def _protocol(entry):
    """The entry's protocol, or None when generated data made it something else than a string."""
    protocol = entry.get("protocol", "tcp")
    return protocol if isinstance(protocol, str) else None


def _unique_container_ports(ports):
    seen = set()
    for entry in ports:
        if not isinstance(entry, dict) or not _is_port(entry.get("container_port")):
            continue
        protocol = _protocol(entry)
        if protocol is None:
            continue
        if (protocol, int(entry["container_port"])) in seen:
            entry["container_port"] = next(p for p in range(1, 65536) if (protocol, p) not in seen)
        seen.add((protocol, int(entry["container_port"])))


def _unique_host_ports(ports, may_unpin):
    # In a sandbox spec a second pin of the same host port becomes unpinned (the server picks one):
    # a new value could leave host_port_range, which the hook does not know. An agent's ports are
    # always pinned, over the whole port range.
    seen = set()
    for entry in ports:
        if not isinstance(entry, dict) or not _is_port(entry.get("host_port")):
            continue
        protocol = _protocol(entry)
        if protocol is None:
            continue
        if (protocol, int(entry["host_port"])) in seen:
            if may_unpin:
                entry["host_port"] = None
                continue
            entry["host_port"] = next(p for p in range(1, 65536) if (protocol, p) not in seen)
        seen.add((protocol, int(entry["host_port"])))


def _probe_on_a_tcp_port(spec):
    probe = spec.get("readiness_probe")
    ports = spec.get("ports", [])
    if not isinstance(probe, dict) or not isinstance(ports, list) or not _is_port(probe.get("port")):
        return
    if probe.get("protocol") == "tcp" and "path" in probe and probe["path"] is not None:
        probe["protocol"] = "http"
    port = probe["port"]
    if any(isinstance(p, dict) and p.get("container_port") == port and p.get("protocol", "tcp") == "tcp" for p in ports):
        return
    if len(ports) < 100:
        ports.append({"container_port": port, "protocol": "tcp"})
        spec["ports"] = ports


def _repair_spec(spec, may_unpin=True):
    if not isinstance(spec, dict):
        return
    if isinstance(spec.get("containers"), list):
        _unique_container_names(spec["containers"])
    if isinstance(spec.get("ports"), list):
        _unique_container_ports(spec["ports"])
        _unique_host_ports(spec["ports"], may_unpin)
    _probe_on_a_tcp_port(spec)


@schemathesis.hook
def map_body(ctx, body):
    if ctx.operation is None or not isinstance(body, dict):
        return body
    label = f"{ctx.operation.method.upper()} {ctx.operation.path}"
    if label not in SPEC_OPERATIONS:
        return body
    # The agent's create request carries the spec's fields at the top level.
    if label.startswith("POST /api/v1/nodes/"):
        _repair_spec(body, may_unpin=False)
    else:
        _repair_spec(body.get("spec"))
    return body
