"""``twistd inference``: command line and service construction (placeholder until its issue lands)."""

from twisted.application import service
from twisted.python import usage


class Options(usage.Options):
    optParameters: list[list[str | None]] = []


def makeService(options: Options) -> service.IService:
    return service.MultiService()
