"""What both web apps (annotate_RORem.py, app_RORem.py) need from their server: a port that can be
had, said in one line before any model is loaded; only the host names the server was started for
(a web page that rebinds its own name to 127.0.0.1 is refused: DNS rebinding); one way to run it."""
import errno
import socket

from .args import integer
from .errors import UserError

PORT = integer(1, 65535)
LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")


def add_server_args(parser, port=7860):
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    parser.add_argument("--port", type=PORT, default=port)
    parser.add_argument("--allowed_host", action="append", default=[],
                        help="a host name the page may be opened under besides this machine's own names (a proxy's, an "
                             "SSH tunnel's); repeatable")


def allowed_hosts(bind, extra=()):
    """Host names (as a browser sends them in Host) the server answers: this machine's loopback names,
    the bound address, and for a bind to every interface the machine's own name and addresses."""
    names = set(LOCAL_NAMES) | {bind.strip("[]").lower()} | {h.lower() for h in extra}
    if bind in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
        names |= {host.lower(), socket.getfqdn().lower()}
        try:
            names |= {info[4][0] for info in socket.getaddrinfo(host, None)}
        except OSError:
            pass
    return sorted(names - {""})


def check_port(host, port):
    """Say in one line when the port cannot be had (in use, no permission, no such address), before
    minutes of model loading."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise UserError(f"--host {host}: not an address of this machine ({e.strerror or e})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what uvicorn sets: a port in TIME_WAIT is free
        try:
            s.bind(address)
        except OSError as e:
            why = {errno.EADDRINUSE: "in use (another server? give --port)", errno.EACCES: "needs privileges (give --port above 1023)",
                   errno.EADDRNOTAVAIL: "not an address of this machine"}.get(e.errno, e.strerror or str(e))
            raise UserError(f"--host {host} --port {port}: {why}") from None


def guard_hosts(app, hosts):
    """The ASGI app answering only requests whose Host header names one of `hosts` (400 otherwise)."""
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    return TrustedHostMiddleware(app, allowed_hosts=list(hosts), www_redirect=False)


def serve(app, args):
    """Run an ASGI app (guard_hosts'd) on --host/--port until stopped (Ctrl-C, SIGTERM)."""
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
