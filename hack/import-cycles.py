#!/usr/bin/env python3
"""Fails when two modules of src/ or controllers/src/ import each other (`use crate::..`/`super::..`
outside tests), so the dependency direction inside a crate stays one way. Prints each pair."""
import itertools
import os
import re
import sys


def module_of(root, path):
    parts = os.path.relpath(path, root)[:-3].split("/")
    return tuple(parts[:-1] if parts[-1] in ("mod", "lib", "main") else parts)


def imports(root, modules, module, path):
    text = open(path).read().split("#[cfg(test)]")[0]
    found = set()
    for base, rest in re.findall(r"\b(crate|super)::([a-z_]+(?:::[a-z_]+)*)", text):
        segments = rest.split("::")
        parent = list(module[:-1]) if base == "super" else []
        candidate = parent + segments
        for k in range(len(candidate), 0, -1):
            if tuple(candidate[:k]) in modules and tuple(candidate[:k]) != module:
                found.add(tuple(candidate[:k]))
                break
    return found


def main():
    cycles = []
    for root in ("src", "controllers/src"):
        paths = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".rs")]
        modules = {module_of(root, p): p for p in paths}
        edges = {m: imports(root, modules, m, p) for m, p in modules.items()}
        for a, b in itertools.combinations(modules, 2):
            if b in edges[a] and a in edges[b]:
                cycles.append(f"{root}: {'::'.join(a)} <-> {'::'.join(b)}")
    for c in cycles:
        print(f"import cycle: {c}", file=sys.stderr)
    sys.exit(1 if cycles else 0)


if __name__ == "__main__":
    main()
