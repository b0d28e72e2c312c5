"""Run a flow in this process, with the same parameters as a deployment run:

    python -m flows pretrain -p recipe=vitg14 -p dry_run=true
    python -m flows evaluate -p backbone=outputs/pretrain/teacher/backbone.safetensors

Values are read as YAML (``-p overrides='[optim.epochs=2]'``). The Prefect API (PREFECT_API_URL) and the
MLflow server (MLFLOW_TRACKING_URI) are checked first: one that does not answer is a one-line error naming
its URL, before any work.
"""

import argparse
import importlib
import inspect
import sys

import yaml

FLOWS = ("pretrain", "distill", "evaluate", "curate", "pipeline")


def parse_parameters(pairs: list[str]) -> dict:
    parameters = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise ValueError(f"parameter {pair!r} must look like name=value")
        parameters[key] = yaml.safe_load(value)
    return parameters


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__.splitlines()[0])
    parser.add_argument("flow", choices=FLOWS)
    parser.add_argument("-p", "--param", action="append", default=[], help="flow parameter name=value (repeatable)")
    arguments = parser.parse_args(argv)
    from flows.services import ServiceError, check_prefect_api, check_tracking_server

    try:
        parameters = parse_parameters(arguments.param)
        check_prefect_api()
        check_tracking_server()
    except (ServiceError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    flow = getattr(importlib.import_module(f"flows.{arguments.flow}"), arguments.flow)
    known = list(inspect.signature(flow.fn).parameters)
    unknown = [name for name in parameters if name not in known]
    if unknown:
        print(
            f"error: flow {arguments.flow} has no parameter {', '.join(unknown)}; it takes {', '.join(known)}",
            file=sys.stderr,
        )
        sys.exit(2)
    result = flow(**parameters, return_state=True)
    if not result.is_completed():
        message = " ".join((result.message or "").split())
        print(f"error: flow {arguments.flow} {result.type.value.lower()}: {message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
