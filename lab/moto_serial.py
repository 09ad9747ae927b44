"""moto's server, serving one request at a time: the DynamoDB emulator of the lab and tests.

Usage: <python with moto[server]> lab/moto_serial.py -H 127.0.0.1 -p PORT

Why: `moto_server` runs werkzeug with a thread per request, and moto's DynamoDB does not
lock around a conditional write's check and its write. Threaded, it is not linearizable:
four threads racing a conditional UpdateItem on one item got two or more winners in 33 of
150 trials, and racing transactions both applied or failed with HTTP 500. Served one
request at a time it is (0 of 150), which is what the worker's election and leases rely on.
worker/tests/it/emulator_conformance.rs fails if that ever stops being true.

This is `moto.server.main` (moto 5.2.5) with `threaded=False, processes=1` and without its
reloader and TLS options: the same application (`DomainDispatcherApplication` over
`create_backend_app`), the same request handler, so `GET /` still answers 200 and the
`/moto-api/...` endpoints (reset, ...) still work. Without threads werkzeug speaks HTTP/1.0
and closes every connection after its response, so an idle keep-alive connection cannot
hold the only thread. Started by `cargo xtask` (xtask/src/emulators.rs) and the flake's
emulator check.
"""

import argparse
import os
import signal
import sys

from werkzeug.serving import run_simple

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="moto server, one request at a time (see the module docstring)"
    )
    parser.add_argument("-H", "--host", default="127.0.0.1", help="address to bind")
    parser.add_argument(
        "-p",
        "--port",
        type=int,
        default=int(os.environ.get("MOTO_PORT", 5000)),
        help="port to bind",
    )
    args = parser.parse_args(argv)

    # As moto.server.main: moto builds some URLs (e.g. SQS queue URLs) from MOTO_PORT.
    os.environ.setdefault("MOTO_PORT", str(args.port))
    # Exit cleanly on SIGTERM/SIGINT, as moto_server does.
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    app = DomainDispatcherApplication(create_backend_app)
    app.debug = True  # as moto.server.main

    run_simple(
        args.host,
        args.port,
        app,
        threaded=False,
        processes=1,
        request_handler=MotoRequestHandler,
    )


if __name__ == "__main__":
    main()
