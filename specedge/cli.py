"""`specedge` command line: demo, models, device, cloud, fleet, certs, channel, bench, power, broker,
install-service."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# The command modules, in help order. Each has add_parser(subparsers) (or the function named after
# its ':'), which adds its command (or command group) with the function that runs it, run(args) or
# another, as `func`; that returns the exit code.
COMMANDS = (
    "specedge.tools.demo",  # demo
    "specedge.fetch",  # models fetch | ls
    "specedge.cloud.serve",  # cloud run | train-exit-head | prune-layers | self-test | exit-agreement
    "specedge.device.commands",  # device run | serve | build-engine | apply-power-profile
    "specedge.fleet_cli",  # fleet
    "specedge.certs",  # certs
    "specedge.systemd",  # install-service, uninstall-service
    "specedge.tools.bench_draft",  # bench-draft
    "specedge.tools.bench_engines",  # bench-engines
    "specedge.tools.channel",  # channel
    "specedge.tools.bench",  # bench
    "specedge.tools.bench_verifier",  # bench-verifier
    "specedge.tools.bench_apps",  # bench-apps
    "specedge.tools.compare",  # compare
    "specedge.tools.profile",  # profile
    "specedge.tools.fidelity",  # fidelity
    "specedge.tools.plan",  # plan, regimes
    "specedge.tools.faults",  # faults
    "specedge.tools.soak",  # soak
    "specedge.tools.fuzz",  # fuzz
    "specedge.device.commands:add_power_parser",  # power
    "specedge.broker",  # broker
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specedge", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for entry in COMMANDS:
        module, _, adder = entry.partition(":")
        getattr(importlib.import_module(module), adder or "add_parser")(sub)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from specedge.config import ConfigError
    from specedge.device.request import RequestFailed
    from specedge.fetch import FetchError
    from specedge.loader import ModelFileError
    from specedge.mqtt import BrokerUnavailable

    try:
        return args.func(args)
    except (ConfigError, FetchError, ModelFileError, BrokerUnavailable, RequestFailed) as exc:
        print(f"specedge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
