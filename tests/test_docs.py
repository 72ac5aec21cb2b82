# SPDX-License-Identifier: Apache-2.0
"""The docs cover the public API, and the tutorials say how long their full mode takes."""

import re
from pathlib import Path

import pyro_softmix as psm

ROOT = Path(__file__).parent.parent


def test_every_public_name_is_in_the_api_reference():
    api = (ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^\.\. auto\w+:: pyro_softmix\.(\w+)", api, flags=re.M))
    modules = set(re.findall(r"^\.\. auto\w+:: pyro_softmix\.(\w+)\.", api, flags=re.M))
    missing = [n for n in psm.__all__ if n not in documented and n not in modules]
    assert not missing, f"add to docs/api.md: {missing}"


def test_the_docs_build_suppresses_no_warnings():
    conf = (ROOT / "docs" / "conf.py").read_text()
    assert "suppress_warnings" not in conf


def test_each_tutorial_states_its_full_wall_time_at_the_top():
    for path in sorted((ROOT / "tutorials").glob("*.md")):
        text = path.read_text()
        heading = text.index("\n# ")
        intro = text[heading: text.index("```", heading)]
        assert re.search(r"full mode takes about [\d.]+ (s|min)", intro, flags=re.I), path.name
