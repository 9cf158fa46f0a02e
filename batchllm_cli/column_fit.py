"""--truncate-column: how far to cut a row's cells so its prompt fits.

The cells are cut by their own tokens, from their ends, to a common cap: every cell keeps at most `cap`
of its tokens, so the longest cell is cut first, down to the next one's length, before that one is cut.
The prompt's length in tokens is not the cells' kept tokens plus a constant: one cell token can cost
several prompt tokens (a template's `| tojson` turns é into \\u00e9, a column can be printed twice) or
fewer (merges across the cut). So the cap is searched: a first guess as if one cell token were one
prompt token (right for most rows: one render), then a search between the largest cap seen to fit and
the smallest seen not to, guessing by interpolation and bisecting whenever a guess did not halve that
range, so a row takes O(log n) renders at worst.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence, TypeVar

Failure = TypeVar("Failure")  # why a row has no prompt (prompts.FailedRow); passed through as is
Prompt = tuple[str, list[int]]  # the prompt text and its token ids


def _kept(lengths: Sequence[int], cap: int) -> int:
    return sum(min(n, cap) for n in lengths)


def _cap_keeping(lengths: Sequence[int], tokens: float) -> int:
    """The largest cap at which the cells keep at most `tokens` tokens in all (0 when none does)."""
    lo, hi = 0, max(lengths, default=0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _kept(lengths, mid) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return lo


def cut_cells(cells: Mapping[str, tuple[str, list[int]]], cap: int) -> dict[str, str]:
    """Each cell's text cut to its first `cap` tokens; `cells` maps a column to (text, where each of
    its tokens ends in the text)."""
    return {name: text if cap >= len(ends) else text[: ends[cap - 1]] if cap else ""
            for name, (text, ends) in cells.items()}


def fit_cells(
    cells: Mapping[str, tuple[str, list[int]]],
    limit: int,
    full: Prompt,
    render: Callable[[dict[str, str]], Prompt | Failure],
) -> tuple[Prompt, bool] | Failure:
    """The prompt with the cells cut to the largest cap whose prompt has at most `limit` tokens, and
    True; or, when even empty cells do not fit, the prompt with them empty and False. `full` is the
    prompt of the uncut cells (already known not to fit); `render` makes the prompt of cut cells, or
    returns why the row has none, which is returned as is."""
    lengths = [len(ends) for _, ends in cells.values()]
    fits: tuple[int, Prompt] | None = None  # the largest cap seen to fit, and its prompt
    over: tuple[int, Prompt] = (max(lengths, default=0), full)  # the smallest cap seen not to fit
    bisect = False
    while over[0] - (fits[0] if fits else -1) > 1:
        low = fits[0] if fits else -1
        width = over[0] - low
        over_kept, over_len = _kept(lengths, over[0]), len(over[1][1])
        if bisect:
            cap = (low + over[0]) // 2
        elif fits is None:  # as if each cell token were one prompt token
            cap = _cap_keeping(lengths, over_kept - (over_len - limit))
        else:  # where the line between the two known prompt lengths crosses the limit
            fit_kept, fit_len = _kept(lengths, fits[0]), len(fits[1][1])
            cap = _cap_keeping(lengths, fit_kept + (limit - fit_len) * (over_kept - fit_kept) / (over_len - fit_len))
        cap = min(max(cap, low + 1), over[0] - 1)
        prompt = render(cut_cells(cells, cap))
        if not isinstance(prompt, tuple):
            return prompt
        if len(prompt[1]) > limit:
            over = (cap, prompt)
        else:
            fits = (cap, prompt)
            if len(prompt[1]) == limit:  # full: a longer cut would add tokens
                break
        bisect = 2 * (over[0] - (fits[0] if fits else -1)) > width
    return (fits[1], True) if fits else (over[1], False)
