"""The app-password format: 16 characters, selector + secret, no look-alikes, grouped display."""

from hypothesis import given
from hypothesis import strategies as st

from proxy.codes.generate import ALPHABETS, CODE_LENGTH, LOWER, MIXED, generate, normalise, split


def test_mixed_alphabet_leaves_out_look_alikes():
    assert not set("0Oo1lI") & set(MIXED)
    assert len(set(MIXED)) == len(MIXED) == 56


def test_lower_alphabet_is_lowercase_without_look_alikes():
    assert LOWER.lower() == LOWER
    assert not set("0o1l") & set(LOWER)
    assert len(set(LOWER)) == 32


def test_generated_code_has_sixteen_characters_from_its_alphabet():
    for name, symbols in ALPHABETS.items():
        code = generate(name)
        assert len(code.value) == CODE_LENGTH
        assert set(code.value) <= set(symbols)


def test_selector_is_the_first_four_characters():
    code = generate()
    assert code.selector == code.value[:4]


def test_generate_avoids_the_accounts_other_selectors():
    taken = {generate().selector for _ in range(50)}
    for _ in range(200):
        assert generate(avoid_selectors=taken).selector not in taken


def test_codes_are_shown_in_four_groups_of_four():
    code = generate()
    groups = code.grouped().split("-")
    assert [len(g) for g in groups] == [4, 4, 4, 4]
    assert "".join(groups) == code.value


def test_repr_never_shows_the_code():
    code = generate()
    assert code.value not in repr(code)


def test_spaces_and_dashes_between_groups_are_ignored():
    code = generate()
    assert split(code.grouped()) == (code.selector, code.value)
    spaced = " ".join(code.value[i : i + 4] for i in range(0, 16, 4))
    assert split(spaced) == (code.selector, code.value)


def test_case_is_not_normalised():
    assert normalise("AbCd-EfGh") == "AbCdEfGh"


def test_wrong_length_or_foreign_characters_are_not_codes():
    assert split("abc") is None
    assert split("abcd-efgh-ijkm-npq") is None
    assert split("abcd_efgh_ijkm_npqr") is None
    assert split("abcd-efgh-ijkm-npq0") is None  # 0 is a look-alike, never issued


@given(st.text())
def test_normalise_removes_exactly_spaces_and_dashes(typed):
    out = normalise(typed)
    assert " " not in out and "-" not in out
    assert out == "".join(c for c in typed if c not in " -")


@given(st.lists(st.sampled_from([" ", "-", "  ", " - "]), min_size=17, max_size=17))
def test_any_spacing_between_characters_gives_the_same_code(separators):
    code = generate()
    typed = (
        "".join(sep + ch for sep, ch in zip(separators, code.value, strict=False)) + separators[-1]
    )
    assert split(typed) == (code.selector, code.value)


@given(st.text(max_size=40))
def test_split_never_raises_and_only_accepts_sixteen_known_symbols(typed):
    result = split(typed)
    if result is not None:
        selector, code = result
        assert len(code) == 16 and code.startswith(selector)
        assert set(code) <= set(MIXED) | set(LOWER)
