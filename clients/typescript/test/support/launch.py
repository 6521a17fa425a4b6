"""Start ``twistd -n <plugin> ...`` for the SDK's tests with a listening TCP socket on a free port.

The socket is bound here (port 0, so runs never collide) and handed to the daemon as systemd would
(fd 3, ``LISTEN_FDS=1``, ``LISTEN_FDNAMES``, ``LISTEN_PID`` = this process, which exec keeps); its
port is printed as one JSON line before the exec. The daemon serves it with
``--listen systemd:domain=INET:index=0``.

    python launch.py llmrouter --listen systemd:domain=INET:index=0 --keys-dir ... --inference ...
"""

import json
import os
import socket
import sys

TWISTD = "from twisted.scripts.twistd import run; run()"


def main() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    if listener.fileno() != 3:
        os.dup2(listener.fileno(), 3)
    os.set_inheritable(3, True)  # also when the socket already is fd 3 (dup2 would not touch it)
    # Twisted adopts inherited sockets only when LISTEN_FDNAMES has one name per descriptor.
    os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="public", LISTEN_PID=str(os.getpid()))
    print(json.dumps({"port": listener.getsockname()[1]}), flush=True)
    argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", *sys.argv[1:]]
    os.execv(sys.executable, argv)  # noqa: S606  (the test's own interpreter, no shell)


if __name__ == "__main__":
    main()
