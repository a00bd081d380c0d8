"""The local clusters' ports stay out of the kernel's ephemeral range, where an outgoing
connection can take a port between the free-port check and the listener's bind."""

import pytest

from e2e import airgap
from e2e.cluster import Ports, ephemeral_port_range


def test_the_ephemeral_range_is_read_from_the_kernel_with_linuxs_default_as_fallback(tmp_path):
    custom = tmp_path / "range"
    custom.write_text("40000\t50000\n")
    assert ephemeral_port_range(custom) == (40000, 50000)
    assert ephemeral_port_range(tmp_path / "missing") == (32768, 60999)


def test_a_port_base_reaching_into_the_ephemeral_range_is_refused():
    low, high = ephemeral_port_range()
    for base in (low - 3, low, (low + high) // 2, high):
        with pytest.raises(ValueError, match="ephemeral port range"):
            Ports(base)


def test_the_port_bases_the_project_uses_are_accepted():
    for base in (16443, airgap.PORT_BASE, 26443, 26543, 26643, 28443):
        assert Ports(base).registry == base + 6
