"""
The command-line base every pbrealms tool shares (L{pbrealms.options}).
"""

from __future__ import annotations

import pytest
from twisted.python import usage

from pbrealms.options import refuseAbbreviations


@pytest.mark.parametrize("shortOpt", ["", "v", "p:", "p:v"])
def test_a_whole_option_is_accepted_whatever_the_short_options(shortOpt):
    # A command without short options (a client subcommand) once raised
    # ValueError from its own checks.
    refuseAbbreviations(["--count", "2", "--verbose"], shortOpt, ["count=", "verbose"])


@pytest.mark.parametrize("shortOpt", ["", "c:"])
def test_a_prefix_is_refused_whatever_the_short_options(shortOpt):
    with pytest.raises(usage.UsageError) as e:
        refuseAbbreviations(["--cou", "2"], shortOpt, ["count=", "counter"])
    assert str(e.value) == "--cou: give the whole option name (--count or --counter)"


def test_a_short_option_value_is_not_taken_for_an_option():
    # -c takes a value: "--cou" after it is that value, not an option.
    refuseAbbreviations(["-c", "--cou", "--count=1"], "c:", ["count="])
