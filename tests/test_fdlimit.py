"""aioqueue.fdlimit: how many connections an open-files limit leaves room for."""

import pytest

from aioqueue.fdlimit import RESERVED, FdLimit, connection_cap


def limit(soft: int) -> FdLimit:
    return FdLimit(soft=soft, hard=soft, before=soft)


@pytest.mark.parametrize(
    ("max_connections", "soft", "cap"),
    [
        pytest.param(4096, 1048576, 4096, id="room-for-all"),
        pytest.param(4096, 4096 + RESERVED, 4096, id="just-room-for-all"),
        pytest.param(4096, 4096 + RESERVED - 1, 4095, id="one-short"),
        pytest.param(4096, 1024, 1024 - RESERVED, id="linux-default"),
        pytest.param(4096, 256, 128, id="macos-default-half-kept"),
        pytest.param(4096, 200, 100, id="small-half-kept"),
        pytest.param(4096, 1, 1, id="never-zero"),
        pytest.param(4096, -1, 4096, id="no-limit"),
    ],
)
def test_connection_cap_keeps_descriptors_for_the_rest(
    max_connections: int, soft: int, cap: int
) -> None:
    assert connection_cap(max_connections, limit(soft)) == cap


def test_no_limit_where_there_is_no_rlimit() -> None:
    assert connection_cap(10, None) == 10
