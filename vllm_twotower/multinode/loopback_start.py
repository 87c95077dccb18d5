"""``ray start`` for a second node on a loopback-only host (used by :mod:`.loopback`).

A non-head ``ray start`` needs ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` on, and with it on, Ray
rewrites the head's ``127.0.0.1`` to the host's outward address
(``ray._private.services.resolve_ip_for_localhost``), where a loopback-only head does not
listen.  This runs Ray's own CLI with that rewrite made the identity, in this process only.
Never needed across real machines, whose addresses are not loopback ones.
"""

from __future__ import annotations

import sys


def main() -> None:
    import ray._private.services as services
    from ray.scripts.scripts import cli

    services.resolve_ip_for_localhost = lambda host: host
    sys.argv = ["ray", "start", *sys.argv[1:]]
    cli()


if __name__ == "__main__":
    main()
