"""Exact edit distance (moegrok.analysis.levenshtein) against rapidfuzz and a plain Wagner-Fischer DP."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

from moegrok.analysis.levenshtein import LevenshteinError, encode_text, levenshtein_matrix, levenshtein_pairs
from moegrok.errors import MoegrokError


def dp_distance(a, b) -> int:
    """Wagner-Fischer, one row at a time: the textbook definition, independent of any bit trick."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def rf_matrix(a, b) -> np.ndarray:
    return cdist(list(a), list(b), scorer=Levenshtein.distance, dtype=np.int32)


def rand_seqs(rng, lengths, alphabet):
    return [rng.integers(0, alphabet, n).tolist() for n in lengths]


def test_hand_worked_strings():
    words = ["kitten", "sitting", "", "flaw", "lawn", "a"]
    d = levenshtein_matrix(words)
    assert d[0, 1] == 3 and d[3, 4] == 2 and d[2, 1] == 7 and d[5, 2] == 1 and d[0, 5] == 6
    assert d.dtype == np.int32 and d.shape == (6, 6)
    want = np.array([[dp_distance(x, y) for y in words] for x in words])
    np.testing.assert_array_equal(d, want)


@pytest.mark.parametrize("alphabet", [2, 1000])
def test_word_boundary_lengths_against_dp_and_rapidfuzz(alphabet):
    # Block edges of the 31-bit words and of 32/64-bit words elsewhere; a 2-letter alphabet makes long carry chains.
    rng = np.random.default_rng(alphabet)
    lengths = [0, 1, 2, 30, 31, 32, 33, 61, 62, 63, 64, 65, 93, 94, 127, 128]
    a = rand_seqs(rng, lengths, alphabet)
    b = rand_seqs(rng, lengths[::-1] + [5, 70], alphabet)
    np.testing.assert_array_equal(levenshtein_matrix(a, b), rf_matrix(a, b))
    np.testing.assert_array_equal(levenshtein_matrix(a), rf_matrix(a, a))
    for x, y in [(a[5], b[3]), (a[11], b[4]), (a[0], b[0]), (a[15], a[14])]:
        assert levenshtein_matrix([x], [y])[0, 0] == dp_distance(x, y)


def test_long_sequences_small_and_large_alphabets():
    rng = np.random.default_rng(7)
    lengths = [1000, 1031, 1300, 0, 45]
    for alphabet in (4, 5000):
        a = rand_seqs(rng, lengths, alphabet)
        b = rand_seqs(rng, [1200, 999, 3], alphabet)
        np.testing.assert_array_equal(levenshtein_matrix(a, b), rf_matrix(a, b))
    # A near-copy: the distance is small, the DP path hugs the diagonal over > 1000 columns.
    x = rng.integers(0, 3, 1100).tolist()
    y = x[:500] + [9] + x[500:900] + x[905:]
    assert levenshtein_matrix([x], [y])[0, 0] == Levenshtein.distance(x, y) == 6


def test_arbitrary_int_symbols_beyond_256():
    rng = np.random.default_rng(3)
    symbols = np.array([-2**50, -7, 0, 255, 256, 10**6, 2**40, 2**62] + list(range(1000, 1400)), np.int64)
    a = [symbols[rng.integers(0, symbols.size, n)].tolist() for n in (0, 1, 40, 63, 64, 150)]
    b = [symbols[rng.integers(0, symbols.size, n)].tolist() for n in (3, 64, 90)]
    np.testing.assert_array_equal(levenshtein_matrix(a, b), rf_matrix(a, b))
    np.testing.assert_array_equal(levenshtein_matrix(b, a), rf_matrix(b, a))


def test_random_unequal_lengths_b_given_and_none():
    rng = np.random.default_rng(11)
    a = rand_seqs(rng, rng.integers(0, 140, 37), 6)
    b = rand_seqs(rng, rng.integers(0, 300, 23), 6)
    np.testing.assert_array_equal(levenshtein_matrix(a, b), rf_matrix(a, b))
    d = levenshtein_matrix(a)
    np.testing.assert_array_equal(d, rf_matrix(a, a))
    np.testing.assert_array_equal(d, d.T)
    assert (np.diag(d) == 0).all()


def test_small_chunks_cover_every_pair_once_symmetric_and_not():
    # chunk=8 pairs forces many tiles, including tiles that straddle the diagonal of the symmetric matrix.
    rng = np.random.default_rng(5)
    a = rand_seqs(rng, rng.integers(0, 80, 45), 3)
    b = rand_seqs(rng, rng.integers(0, 80, 19), 3)
    np.testing.assert_array_equal(levenshtein_matrix(a, chunk=8), rf_matrix(a, a))
    np.testing.assert_array_equal(levenshtein_matrix(a, b, chunk=8), rf_matrix(a, b))


def test_padded_array_inputs_numpy_and_jax():
    rng = np.random.default_rng(2)
    lens_a = np.array([0, 5, 40, 33])
    lens_b = np.array([7, 0, 12])
    A = rng.integers(0, 5, (4, 40))
    B = rng.integers(0, 5, (3, 12)).astype(np.uint16)
    la = [A[k, :n].tolist() for k, n in enumerate(lens_a)]
    lb = [B[k, :n].tolist() for k, n in enumerate(lens_b)]
    want = rf_matrix(la, lb)
    np.testing.assert_array_equal(levenshtein_matrix(A, B, a_lengths=lens_a, b_lengths=lens_b), want)
    np.testing.assert_array_equal(
        levenshtein_matrix(jnp.asarray(A), jnp.asarray(B.astype(np.int32)), a_lengths=jnp.asarray(lens_a),
                           b_lengths=lens_b), want)
    # Without lengths a padded array is taken at full width.
    np.testing.assert_array_equal(levenshtein_matrix(A), rf_matrix(A.tolist(), A.tolist()))


def test_strings_are_code_points_and_mix_with_ints():
    d = levenshtein_matrix(["ab", "héllo"], [[97, 98], "hello", [104, 233, 108, 108, 111]])
    np.testing.assert_array_equal(d, [[0, 5, 5], [5, 1, 0]])
    codes, lens = encode_text(["ab", "", "héllo"])
    assert codes.dtype == np.int32 and lens.tolist() == [2, 0, 5]
    assert codes[0, :2].tolist() == [97, 98] and (codes[0, 2:] == -1).all() and (codes[1] == -1).all()
    assert codes[2].tolist() == [104, 233, 108, 108, 111]
    np.testing.assert_array_equal(levenshtein_matrix(codes, a_lengths=lens), levenshtein_matrix(["ab", "", "héllo"]))


def test_pairs_match_the_matrix_entries():
    rng = np.random.default_rng(4)
    a = rand_seqs(rng, rng.integers(0, 200, 30), 8)
    b = rand_seqs(rng, rng.integers(0, 100, 12), 8)
    i = rng.integers(0, 30, 300)
    j = rng.integers(0, 12, 300)
    np.testing.assert_array_equal(levenshtein_pairs(a, i, j, b), rf_matrix(a, b)[i, j])
    j2 = rng.integers(0, 30, 300)
    np.testing.assert_array_equal(levenshtein_pairs(a, i, j2), rf_matrix(a, a)[i, j2])
    assert levenshtein_pairs(a, [], []).shape == (0,)


def test_empty_inputs():
    assert levenshtein_matrix([]).shape == (0, 0)
    assert levenshtein_matrix([[1, 2]], []).shape == (1, 0)
    np.testing.assert_array_equal(levenshtein_matrix([[], []], [[], [1, 2, 3]]), [[0, 3], [0, 3]])


seq = st.lists(st.integers(min_value=-3, max_value=3), max_size=70)
big_seq = st.lists(st.sampled_from([-(2**40), -1, 0, 300, 2**33, 70000]), max_size=70)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=st.lists(st.one_of(seq, big_seq), min_size=1, max_size=9),
       b=st.one_of(st.none(), st.lists(st.one_of(seq, big_seq), min_size=1, max_size=9)))
def test_property_equals_rapidfuzz(a, b):
    want = rf_matrix(a, a if b is None else b)
    np.testing.assert_array_equal(levenshtein_matrix(a, b), want)


@pytest.mark.parametrize("call, match", [
    (lambda: levenshtein_matrix(np.ones((2, 3))), "integer symbols"),
    (lambda: levenshtein_matrix([[1.5, 2.0]]), r"a\[0\].*integer"),
    (lambda: levenshtein_matrix(np.ones((2, 3, 4), int)), "2-D"),
    (lambda: levenshtein_matrix("abc"), "sequence of sequences"),
    (lambda: levenshtein_matrix(np.ones((2, 3), int), a_lengths=[1, 4]), r"a_lengths.*\[0, 3\]"),
    (lambda: levenshtein_matrix(np.ones((2, 3), int), a_lengths=[1]), "a_lengths: shape"),
    (lambda: levenshtein_matrix([[1, 2]], a_lengths=[2]), "padded"),
    (lambda: levenshtein_matrix([[1]], [[np.uint64(2**63)]]), "int64"),
    (lambda: levenshtein_matrix([[1]], chunk=0), "chunk"),
    (lambda: levenshtein_pairs([[1], [2]], [0, 1], [0]), "same length"),
    (lambda: levenshtein_pairs([[1], [2]], [0, 2], [0, 1]), r"i: indices must lie in \[0, 2\)"),
    (lambda: encode_text("abc"), "one str"),
])
def test_bad_input_raises_named_errors(call, match):
    with pytest.raises(LevenshteinError, match=match) as e:
        call()
    assert isinstance(e.value, MoegrokError)
