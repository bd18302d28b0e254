"""
Penalties for sources that fail to log in, in the spirit of OpenSSH's
C{PerSourcePenalties}.

Each failed login from an address adds to that address's penalty, which
drains in real time.  Once the failures not yet drained reach the threshold,
the address is penalised until its penalty has drained: its connections,
new or already open, are told so at their next login
(L{pbrealms.errors.SourcePenalised}) and closed.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

_log = Logger()

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parseNetworks(text: str) -> list[Network]:
    """
    Parse a comma-separated list of addresses and networks
    (C{"10.0.0.0/8,::1"}).

    @raise ValueError: naming the first entry that is neither.
    """
    networks = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an address or a network") from None
    return networks


class SourcePenalties:
    """
    The penalties of the addresses that failed to log in.

    @ivar perFailure: seconds of penalty each failed login adds.
    @ivar threshold: the penalty from which the address is refused, counting
        every failure not yet wholly drained in full: with the defaults,
        any three failures within 5 s reach it.
        (Counting only what is left would need a fourth failure, since
        the first ones drain while the next are tried.)
    @ivar maximum: the most penalty an address can accrue.
    @ivar capacity: the most addresses kept; beyond it the oldest go first.
    """

    def __init__(
        self,
        clock: IReactorTime,
        perFailure: float = 5.0,
        threshold: float = 15.0,
        maximum: float = 600.0,
        exempt: Iterable[Network] = (),
        capacity: int = 65536,
    ) -> None:
        self.clock = clock
        self.perFailure = perFailure
        self.threshold = threshold
        self.maximum = maximum
        self.exempt = list(exempt)
        self.capacity = capacity
        self._until: dict[str, tuple[float, bool]] = {}

    def isExempt(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return True  # a UNIX socket: there is no source to penalise
        return any(address in network for network in self.exempt)

    def failed(self, host: str) -> None:
        """
        Count one failed login from C{host}.  Once the failures not yet
        drained reach the threshold, C{host} is refused until its penalty has
        drained; that is logged once, however many failures follow.
        """
        if self.isExempt(host):
            return
        now = self.clock.seconds()
        until, enforced = self._until.pop(host, (now, False))
        if until <= now:
            until, enforced = now, False
        until = min(until + self.perFailure, now + self.maximum)
        # Failures with some of their penalty left, each counted in full (less
        # a microsecond: rounding must not make two failures at once three).
        undrained = math.ceil((until - now - 1e-6) / self.perFailure) * self.perFailure
        if not enforced and undrained >= self.threshold:
            enforced = True
            # Each further failure lengthens the penalty, up to the maximum:
            # one line when it begins, saying so.
            _log.info(
                "refusing logins from {host} for at least {seconds:.0f} s: too many failed logins",
                host=host,
                seconds=until - now,
            )
        self._until[host] = (until, enforced)  # (re)inserted last: the newest
        if len(self._until) > self.capacity:
            self._prune(now)

    def penalty(self, host: str) -> float:
        """
        The seconds for which C{host} is still refused, or 0 if it is not.
        """
        until, enforced = self._until.get(host, (0.0, False))
        left = until - self.clock.seconds()
        return left if enforced and left > 0 else 0.0

    def _prune(self, now: float) -> None:
        for host in [h for h, (until, _) in self._until.items() if until <= now]:
            del self._until[host]
        while len(self._until) > self.capacity:
            del self._until[next(iter(self._until))]

    def __len__(self) -> int:
        return len(self._until)
