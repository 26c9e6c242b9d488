"""The bundled digits, read without importing scikit-learn, are scikit-learn's digits."""
import numpy as np

from executor.data import DIGITS_TEST_FRACTION, digits


def test_digits_are_sklearns_digits_split_by_the_seed():
    from sklearn.datasets import load_digits
    ref = load_digits()
    d = digits(3)
    assert (len(d.x_train), len(d.x_test)) == (1438, 359) and round(1797 * DIGITS_TEST_FRACTION) == 359
    order = np.random.default_rng(3).permutation(1797)
    assert np.array_equal(d.x_test, (ref.data[order[:359]] / 16.0).astype(np.float32))
    assert np.array_equal(d.y_test, ref.target[order[:359]])
    assert np.array_equal(d.x_train, (ref.data[order[359:]] / 16.0).astype(np.float32))
    assert np.array_equal(d.y_train, ref.target[order[359:]])
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64 and d.classes == 10
