from __future__ import annotations

import pytest

from segue.netsim import Net, available


@pytest.fixture
def net():
    if not available():
        pytest.skip("network namespaces need root and iproute2 (CI runs as root)")
    n = Net()
    yield n
    n.close()
