"""
twistd finds the pbrealms plugin.
"""

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

import pbrealms.tap


def test_plugin_is_found():
    makers = [m for m in getPlugins(IServiceMaker) if m.tapname == "pbrealms"]
    assert len(makers) == 1
    (maker,) = makers
    assert maker.options is pbrealms.tap.Options
    assert maker.makeService is pbrealms.tap.makeService
    assert maker.description
    assert IServiceMaker.providedBy(maker)
