"""``--limit`` over paged lists (admin/flags.py ``limited``), against a server's pages modelled in memory."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st
from spendgate_server.admin.flags import MAX_PAGE_SIZE, limited

DEFAULT_PAGE_SIZE = 50  # what a server answers page_size 0 with (AIP-158)


class PagedList:
    """A server's list of ``total`` items, served in pages of at most MAX_PAGE_SIZE."""

    def __init__(self, total: int) -> None:
        self.items = list(range(total))
        self.asked: list[int] = []

    def page(self, page_size: int, page_token: str) -> tuple[Sequence[int], str]:
        self.asked.append(page_size)
        start = int(page_token or 0)
        end = start + min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        return self.items[start:end], str(end) if end < len(self.items) else ""


@given(total=st.integers(0, 2_000), limit=st.integers(1, 1_600))
def test_a_limit_takes_that_many_over_as_many_pages_as_it_takes(total: int, limit: int) -> None:
    """The first min(limit, total) items, in order, no page asked larger than the servers' largest."""
    server = PagedList(total)
    assert list(limited(limit, server.page)) == server.items[:limit]
    assert all(0 < size <= MAX_PAGE_SIZE for size in server.asked)


@given(total=st.integers(0, 2_000))
def test_limit_zero_is_one_page_of_the_default_size(total: int) -> None:
    """--limit 0: one call with page_size 0, whatever follows it."""
    server = PagedList(total)
    assert list(limited(0, server.page)) == server.items[:DEFAULT_PAGE_SIZE]
    assert server.asked == [0]


def test_the_shown_case_three_revisions() -> None:
    """The reported case: three entries and --limit 0 show all three (it used to show one)."""
    server = PagedList(3)
    assert list(limited(0, server.page)) == [0, 1, 2]
