"""Running the app under uvicorn with a graceful shutdown.

On SIGINT/SIGTERM the schedulers start draining at once (new requests get 503; admitted ones finish for
up to `drain_s`, then end with a final "shutdown" answer), so uvicorn's wait for open connections always
ends; uvicorn's own graceful timeout is a little longer as a backstop.
"""

from __future__ import annotations

from edgekit.errors import EdgekitError


def serve(service, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning", ready=None) -> None:
    import uvicorn  # a missing library of the serve extra: one line naming the extra (edgekit.errors)

    from edgekit.serve.app import create_app

    app = create_app(service)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            service.drain()
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if ready is not None and self.started:
                ready(self)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=int(service.options.drain_s) + 5)
    server = Server(config)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT/SIGTERM it drained for: a clean stop, exit 0
        if not server.started:
            raise
        return
    except OSError as e:
        raise EdgekitError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                           "choose another --port, or stop what uses it") from None
    if not server.started:
        raise EdgekitError(f"the server did not start on {host}:{port}", "check --host and --port")
